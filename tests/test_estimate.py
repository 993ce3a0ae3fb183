"""quantize --dry-run's peak-memory estimate against the peak of the real run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moeconvert.pipeline
from moeconvert.estimate import solve_working_bytes
from moeconvert.pipeline import CPU_CHUNK_BYTES, QuantizeOptions, auto_experts_per_chunk, quantize
from moeconvert.tiny import build_tiny_model

RUN = """
import sys
from moeconvert.pipeline import QuantizeOptions, quantize
options = QuantizeOptions(
    samples=8, seq_len=128, experts_per_chunk=int(sys.argv[4]), expert_statistics=sys.argv[3], device="cpu"
)
quantize(sys.argv[1], output=sys.argv[2], options=options, verify=False, progress=False)
print(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
"""


def test_estimate_is_near_the_measured_peak(tmp_path: Path) -> None:
    """A layer whose memory is its Hessians, not its weights (8 experts of 4096 over a width of 128):
    the peak is the down-projection sums and solve, which the estimate must count."""
    source = build_tiny_model(
        "mixtral", tmp_path / "src", dtype=torch.bfloat16, hidden_size=128, intermediate_size=4096,
        num_hidden_layers=1, num_local_experts=8, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
    )  # fmt: skip
    options = QuantizeOptions(samples=8, seq_len=128, experts_per_chunk=1, device="cpu")  # host memory
    plan = quantize(str(source), output=tmp_path / "out", options=options, dry_run=True, progress=False)
    estimate = plan.sizes["peak_memory_bytes"]
    measured = measured_peak(source, tmp_path / "out", "held", experts_per_chunk=1)
    down_sums = 8 * 4096 * 4096 * 4
    assert measured > down_sums  # the case under test: the sums dominate
    assert 0.8 < estimate / measured < 1.3, (estimate, measured)


def test_replayed_statistics_take_the_gate_up_sums_off_the_peak(tmp_path: Path) -> None:
    """A layer whose memory beyond torch's own is its gate/up sums (64 experts over a width of 1024,
    0.27 GB of float32 sums): replayed, the run peaks lower by most of those sums, and the estimate
    sees it. On a layer this small the fixed cost is most of the peak and the estimate errs high. A
    replayed chunk of 8 experts holds an eighth of the sums again, and VmHWM varies by ~10 MB from run
    to run: the measured drop is 0.69-0.71 of the sums, so 0.4 is asked."""
    source = build_tiny_model(
        "mixtral", tmp_path / "src", dtype=torch.bfloat16, hidden_size=1024, intermediate_size=128,
        num_hidden_layers=1, num_local_experts=64, num_attention_heads=8, num_key_value_heads=2, vocab_size=512,
    )  # fmt: skip
    gate_up_sums = 64 * 1024 * 1024 * 4
    peaks, estimates = {}, {}
    for mode in ("held", "replayed"):
        options = QuantizeOptions(
            samples=8, seq_len=128, experts_per_chunk=8, expert_statistics=mode, device="cpu"
        )
        plan = quantize(str(source), output=tmp_path / mode, options=options, dry_run=True, progress=False)
        estimates[mode] = plan.sizes["peak_memory_bytes"]
        peaks[mode] = measured_peak(source, tmp_path / mode, mode, experts_per_chunk=8)
        assert 0.8 < estimates[mode] / peaks[mode] < 1.5, (mode, estimates[mode], peaks[mode])
    assert peaks["held"] - peaks["replayed"] > 0.4 * gate_up_sums, peaks
    assert estimates["held"] - estimates["replayed"] > 0.6 * gate_up_sums, estimates


def measured_peak(source: Path, output: Path, expert_statistics: str, experts_per_chunk: int) -> int:
    """VmHWM of a quantize run in a fresh process."""
    run = subprocess.run(
        [sys.executable, "-c", RUN, str(source), str(output), expert_statistics, str(experts_per_chunk)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(run.stdout.split()[-1]) * 1024


def test_cpu_chunks_of_held_sums_stop_at_a_gigabyte(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine with 64 GB free, Qwen3-30B-A3B's gate/up experts (2048 -> 1536) go 68 at a time on a
    CPU with their sums held (a larger chunk is no faster there; their Hessians are in the sums), as
    many as half the memory allows when each chunk's sums are replayed (a larger chunk saves sweeps),
    and on a GPU."""
    monkeypatch.setattr(moeconvert.pipeline, "available_bytes", lambda device: 64 << 30)
    per_expert = solve_working_bytes(2048, 1536, 1) - solve_working_bytes(2048, 1536, 0)
    cpu = torch.device("cpu")
    held = auto_experts_per_chunk(2048, 1536, cpu)
    assert held == CPU_CHUNK_BYTES // per_expert == 68
    assert auto_experts_per_chunk(2048, 1536, cpu, replayed_sums=torch.float32) > 4 * held
    assert auto_experts_per_chunk(2048, 1536, torch.device("meta")) > 4 * held
    assert auto_experts_per_chunk(14336, 4096, cpu) == 3  # Mixtral's down: 0.29 GB of weights and codes each


@pytest.mark.parametrize(
    ("stack", "down"),
    [
        ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        ("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj"),
        ("experts.gate_up_proj", "experts.down_proj"),  # Gemma 4's: experts on the decoder layer itself
    ],
)
def test_a_statistics_pass_leaves_the_routed_down_stack_unread(stack: str, down: str) -> None:
    """The pass computes the down projection's inputs itself, so the down stack is neither read nor
    filled, wherever in the layer the experts sit."""
    from moeconvert.estimate import statistics_unread
    from moeconvert.pipeline import Target
    from moeconvert.quant.scheme import Scheme

    assert statistics_unread([Target(stack, "gate_up", Scheme(bits=4, group_size=32), (stack,), 16)]) == (
        down,
    )
