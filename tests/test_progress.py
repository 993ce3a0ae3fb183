"""Progress bars: hidden on request, and the TQDM_* environment still governs the shown ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = "from moeconvert.progress import progress_bar; print(progress_bar(total=3, show={show}).disable)"


@pytest.mark.parametrize(
    ("show", "environment", "hidden"),
    [(True, None, False), (False, None, True), (True, "1", True), (False, "0", True)],
)
def test_bar_visibility(show: bool, environment: str | None, hidden: bool) -> None:
    """In a fresh process, as tqdm reads TQDM_* when it is imported."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    if environment is not None:
        env["TQDM_DISABLE"] = environment
    probe = subprocess.run(
        [sys.executable, "-c", PROBE.format(show=show)], capture_output=True, text=True, env=env, check=True
    )
    assert probe.stdout.strip() == str(hidden)


def test_quantize_shows_progress_inside_each_layer(tiny_models: dict, tmp_path: Path) -> None:
    """Layers of large MoEs take minutes: a bar per layer counts its Linear modules as they are solved.
    The real CLI in a fresh process, without the TQDM_DISABLE the test run sets."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    quantize = [sys.executable, "-m", "moeconvert.cli", "quantize", str(tiny_models["qwen3_moe"])]
    quantize += ["--method", "rtn", "--bits", "8", "--group-size", "32", "--samples", "2", "--seq-len", "32"]
    run = subprocess.run(
        [*quantize, "--no-verify", "-o", str(tmp_path / "out")], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    assert "quantize 8-bit" in run.stderr and "layer 0" in run.stderr and "linear" in run.stderr
    assert "28/28" in run.stderr  # 4 attention projections + 8 experts x 3 projections, all counted
    assert "write shards: 100%" in run.stderr  # the last step, minutes at the largest models' sizes
