"""quantize --dry-run's peak-memory estimate against the peak of the real run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from moeconvert.pipeline import QuantizeOptions, quantize
from moeconvert.tiny import build_tiny_model

RUN = """
import sys
from moeconvert.pipeline import QuantizeOptions, quantize
options = QuantizeOptions(samples=8, seq_len=128, experts_per_chunk=1)
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
    options = QuantizeOptions(samples=8, seq_len=128, experts_per_chunk=1)
    plan = quantize(str(source), output=tmp_path / "out", options=options, dry_run=True, progress=False)
    estimate = plan.sizes["peak_memory_bytes"]
    run = subprocess.run(
        [sys.executable, "-c", RUN, str(source), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=True,
    )
    measured = int(run.stdout.split()[-1]) * 1024
    down_sums = 8 * 4096 * 4096 * 8
    assert measured > down_sums  # the case under test: the sums dominate
    assert 0.8 < estimate / measured < 1.3, (estimate, measured)
