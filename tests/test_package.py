"""The package's public names: all of them there, and none of torch's import cost until one is used."""

from __future__ import annotations

import subprocess
import sys

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
