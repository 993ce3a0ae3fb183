"""The package's public names: all of them there, and none of torch's import cost until one is used."""

from __future__ import annotations

import subprocess
import sys

import pytest

import moeconvert


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_every_public_name_resolves() -> None:
    assert set(moeconvert.__all__) <= set(dir(moeconvert))
    for name in moeconvert.__all__:
        assert getattr(moeconvert, name) is not None, name
    assert moeconvert.quantize.__module__ == "moeconvert.pipeline"


def test_verify_stays_the_function_whichever_import_comes_first() -> None:
    """``moeconvert.verify`` names a function and the submodule defining it; importing the submodule
    first (as ``quantize`` does, through the model card) must not put the module in the function's place."""
    shown = _python(
        "import moeconvert.pipeline, moeconvert.verify as v, moeconvert\n"
        "from moeconvert.verify import report_json\n"
        "print(callable(moeconvert.verify), moeconvert.verify is v, moeconvert.verify.__module__)"
    )
    assert shown == "True True moeconvert.verify"


def test_help_imports_neither_torch_nor_transformers() -> None:
    """``--help`` and option errors answer without the seconds of importing torch and transformers."""
    loaded = _python(
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from moeconvert.cli import main\n"
        "for args in (['--help'], ['quantize', '--help'], ['fuse', '--help'], ['quantize', 'x', '--bits', '3']):\n"
        "    CliRunner().invoke(main, args)\n"
        "import moeconvert\n"
        "moeconvert.Scheme(bits=4)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))"
    )
    assert loaded == "[]"


def _thp_mode() -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``), None if unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def _huge_page_kib_after_a_command(env_value: str | None) -> int:
    """In a fresh process: run a command as the console script does, then touch a 64 MiB tensor and
    return how much of the process's anonymous memory is on huge pages (KiB)."""
    chosen = "os.environ.pop(name, None)" if env_value is None else f"os.environ[name] = {env_value!r}"
    code = (
        "import os\n"
        f"name = 'THP_MEM_ALLOC_ENABLE'\n{chosen}\n"
        "from moeconvert.cli import main\n"
        "try:\n"
        "    main(['check', '/nonexistent-output'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "import torch\n"
        "x = torch.ones(64 << 18)\n"
        "with open('/proc/self/smaps_rollup') as f:\n"
        "    print(next(int(line.split()[1]) for line in f if line.startswith('AnonHugePages:')))\n"
    )
    return int(_python(code))


def test_commands_put_large_tensors_on_huge_pages() -> None:
    """The command line turns on torch's huge-page allocation before any command allocates (first
    touches of fresh memory are a large share of a layer's time), and a user's "0" keeps it off."""
    mode = _thp_mode()
    if mode not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {mode or 'unavailable'} on this machine")
    assert _huge_page_kib_after_a_command(None) >= 32 << 10
    if mode == "madvise":  # only asked-for regions get huge pages: the user's "0" is heard
        assert _huge_page_kib_after_a_command("0") == 0
