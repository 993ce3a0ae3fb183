"""The benchmark scripts still run, end to end, at tiny sizes, and their reports hold what they claim.

The scripts are not part of the package and nothing else runs them between measurements, so a change
to what they call could break them unnoticed. These runs check the facts a report's readers rely on
(the batched solve gives the per-expert loop's codes, fuse's output is the same every round), never a
time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _run(script: str, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"TQDM_DISABLE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_bench_quantize_reports_a_warm_layer_whose_batched_codes_match_the_loop(tmp_path: Path) -> None:
    out = tmp_path / "quantize.json"
    args = ["--preset", "qwen3-30b-a3b", "--width-scale", "0.0625", "--tokens", "256", "--loop-experts", "2"]
    args += ["--threads", "1", "--count-operators", "--out", str(out), "--write-dir", str(tmp_path / "w")]
    printed = _run("bench_quantize.py", *args, "--timed-layers", "3", cwd=tmp_path)

    (preset,) = json.loads(out.read_text())["presets"]
    assert preset["preset"]["hidden"] == 128 and preset["preset"]["experts"] == 128
    assert "qwen3-30b-a3b" in printed and "warm-up layer 1" in printed
    (warm_up,) = preset["warm_up_layers"]  # one untimed layer before the timed one, by default
    for phases in (warm_up, preset["phases"]):
        names = {(row["phase"], row["target"]) for row in phases}
        assert {
            ("solve: batched", "gate_up"),
            ("solve: batched", "down"),
            ("hessian: x x^T", "gate_up"),
        } <= names
    assert not any(row["phase"].startswith("solve: loop") for row in warm_up)
    for target, solve in preset["solve"].items():
        assert solve["codes_differing_from_loop"] == 0.0, target
        per_expert_batched = solve["operators_batched"] / preset["preset"]["experts"]
        per_expert_loop = solve["operators_loop"] / solve["operators_loop_experts"]
        assert per_expert_batched < per_expert_loop / 4, target  # batching issues far fewer operators
    assert preset["summary"]["hessian_products_of_matmul"] > 0

    # three timed layers: every phase of the layer reads the median of its three times, the loop its one
    assert preset["timed_layers"] == 3 and "medians over 3 timed layers" in printed
    probes = preset["matmul_gflops_probes"]  # at the start, before each timed layer, at the end
    assert len(probes) == 5 and preset["matmul_gflops_reference"] == max(probes)
    for row in preset["phases"]:
        if row["phase"].startswith("solve: loop"):
            assert "seconds_each_layer" not in row
        elif not row["phase"].startswith("  of which"):
            assert len(row["seconds_each_layer"]) == 3, row["phase"]
            assert row["seconds"] == sorted(row["seconds_each_layer"])[1], row["phase"]
    for target, solve in preset["solve"].items():
        (batched,) = (r for r in preset["phases"] if r["phase"] == "solve: batched" and r["target"] == target)
        assert solve["batched_seconds"] == batched["seconds"]
        assert solve["speedup_batched_vs_loop"] == solve["loop_seconds_all_experts"] / batched["seconds"]


@pytest.mark.slow
def test_bench_fuse_compares_every_step_and_fuses_the_same_bytes_each_round(tmp_path: Path) -> None:
    out = tmp_path / "fuse.json"
    args = ["--layers", "2", "--hidden", "64", "--experts", "4", "--repeat", "2", "--out", str(out)]
    printed = _run("bench_fuse.py", *args, cwd=tmp_path)

    report = json.loads(out.read_text())
    assert report["fuse_outputs_identical"] is True
    assert set(report["rows"]) == {"copy", "copy+fsync", "copy+wb", "fuse", "unfuse"}
    for step, row in report["rows"].items():
        assert row["best_seconds"] > 0 and row["best_gb_per_s"] > 0, step
    assert report["rows"]["copy"]["vs_copy_best"] == 1.0
    assert "fuse output identical in every round: True" in printed
