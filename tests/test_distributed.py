"""Expert-parallel quantization: 2 ranks over gloo on CPU give the single process's bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from moeconvert.distributed import Ranks, ordered_sum

# Several calibration batches, so that both ranks forward some; act-order exercises the gathered g_idx.
# The CPU, gloo ranks, also where a GPU is present ("auto" would take it, and one GPU holds one rank).
ARGS = ["--group-size", "32", "--samples", "16", "--seq-len", "64", "--batch-tokens", "192", "--no-verify"]
ARGS += ["--device", "cpu"]
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}  # torchrun also gives each rank 1 thread


def quantize(model: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moeconvert", "quantize", str(model), "-o", str(output), *ARGS, *extra]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def manifest(folder: Path) -> dict[str, str]:
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines)}


def comparable(report: dict) -> dict:
    if isinstance(report, dict):
        return {k: comparable(v) for k, v in report.items() if k not in ("seconds", "output")}
    if isinstance(report, list):
        return [comparable(v) for v in report]
    return report


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("mixtral", ()),
        ("deepseek_v2", ("--dynamic-groups", "--format", "gptq")),
        ("olmoe", ("--expert-statistics", "replayed", "--min-tokens", "100000", "--experts-per-chunk", "3")),
    ],  # dense layer, shared experts; gate/up sums replayed, the prior summed across ranks
)
def test_two_gloo_ranks_write_the_single_process_bytes(
    family: str, extra: tuple[str, ...], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    single = quantize(tiny_models[family], tmp_path / "one" / "out", *extra)
    assert single.returncode == 0, single.stderr
    double = quantize(tiny_models[family], tmp_path / "two" / "out", *extra, "--nproc-per-node", "2")
    assert double.returncode == 0, double.stderr
    assert double.stdout.count("wrote ") == 1  # rank 0 reports for the job

    one, two = manifest(tmp_path / "one" / "out"), manifest(tmp_path / "two" / "out")
    assert one.keys() == two.keys()
    assert {name for name in one if one[name] != two[name]} == {"quantization_report.json"}  # timings only
    reports = [
        json.loads((tmp_path / side / "out" / "quantization_report.json").read_text())
        for side in ("one", "two")
    ]
    assert comparable(reports[0]) == comparable(reports[1])
    assert any(
        layer["tokens_per_expert"] for layer in reports[1]["layers"]
    )  # counts gathered from both ranks


def test_more_ranks_than_batches_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "moeconvert", "quantize", str(tiny_models["mixtral"]), "-o", str(tmp_path / "o"),
           "--group-size", "32", "--samples", "2", "--seq-len", "64", "--no-verify", "--device", "cpu",
           "--nproc-per-node", "2"]  # fmt: skip
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "1 calibration batches cannot keep 2 ranks busy" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("count", [1, 7, 8, 128])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_expert_ranges_cover_every_expert_once(count: int, world: int) -> None:
    ranges = [Ranks(rank, world).experts(count) for rank in range(world)]
    assert [e for r in ranges for e in r] == list(range(count))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    assert sorted(b for rank in range(world) for b in range(10) if Ranks(rank, world).owns_batch(b)) == list(
        range(10)
    )


def test_ordered_sum_adds_left_to_right_in_one_process() -> None:
    terms = [
        torch.tensor([1e16], dtype=torch.float64),
        torch.tensor([1.0], dtype=torch.float64),
        torch.tensor([-1e16], dtype=torch.float64),
    ]
    total = ordered_sum(terms, like=terms[0])
    assert total is not None and total.item() == ((1e16 + 1.0) - 1e16)  # order matters: 0.0, not 1.0
    assert ordered_sum([], like=terms[0]) is None


@pytest.mark.slow
def test_killed_two_rank_job_resumes_to_the_same_bytes(tiny_models: dict[str, Path], tmp_path: Path) -> None:

    model = tiny_models["mixtral"]
    assert quantize(model, tmp_path / "one" / "out").returncode == 0
    out = tmp_path / "two" / "out"
    cmd = [
        sys.executable,
        "-m",
        "moeconvert",
        "quantize",
        str(model),
        "-o",
        str(out),
        *ARGS,
        "--nproc-per-node",
        "2",
    ]
    job = subprocess.Popen(
        cmd,
        env={**ENV, "MOECONVERT_TEST_PAUSE_AFTER": "2"},
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    paused = 0
    for line in job.stderr:  # both ranks say so once layers 0-1 are recorded
        paused += "paused after group 2" in line
        if paused == 2:
            break
    # the launcher and both ranks (torchrun starts each rank in a session of its own)
    processes = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
    for process in processes:
        process.kill()
    job.wait()
    _, alive = psutil.wait_procs(processes, timeout=60)  # rank 0 holds the output's lock until it exits
    assert not alive, alive
    records = sorted(p.name for p in (tmp_path / "two" / ".out.partial" / ".resume").iterdir())
    assert records == [
        "hidden.rank0.safetensors",
        "hidden.rank1.safetensors",
        "progress.json",
        "settings.json",
    ]

    resumed = quantize(model, out, "--nproc-per-node", "2")
    assert resumed.returncode == 0 and "3 of 4 layers already done" in resumed.stderr, resumed.stderr
    one, two = manifest(tmp_path / "one" / "out"), manifest(out)
    assert {name for name in one if one[name] != two[name]} == {"quantization_report.json"}


def test_more_cuda_ranks_than_gpus_is_refused_before_they_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks on a one-GPU machine: a one-line refusal naming the way out, not rank 1 dying in torch
    on an invalid device ordinal (as it did on a one-GPU H200 with ``--device auto``). The GPU count is
    patched: the check is arithmetic on it, and CI has no GPU."""
    from moeconvert.distributed import check_gpus
    from moeconvert.errors import BadInputError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(BadInputError, match="2 ranks on CUDA need 2 GPUs .* torch sees 1; pass --device cpu"):
        check_gpus(torch.device("cuda"), 2)
    check_gpus(torch.device("cuda"), 1)
    check_gpus(torch.device("cpu"), 8)  # gloo ranks share the CPU
