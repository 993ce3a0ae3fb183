"""Progress bars: hidden on request, and the TQDM_* environment still governs the shown ones."""

from __future__ import annotations

import os
import subprocess
import sys

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
