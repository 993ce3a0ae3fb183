"""moeconvert: load, re-layout, quantize, verify and publish Mixture-of-Experts checkpoints.

Every pass streams one decoder layer at a time, so peak memory is about one layer whatever the size of
the model. The command line (``moeconvert``) is a thin shell over these functions.

The functions load on first use (PEP 562 ``__getattr__``): ``import moeconvert``, and with it the
command line's ``--help``, does not wait seconds for torch and transformers.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .errors import (
    BadInputError,
    CheckFailedError,
    CorruptCheckpointError,
    ModelNotFoundError,
    MoeConvertError,
    OutputExistsError,
    PushFailedError,
    UnsupportedModelError,
)
from .quant.scheme import Scheme
from .quant.targets import Rule

if TYPE_CHECKING:
    from .inspection import ModelSummary, inspect_model
    from .manifest import CheckReport, check
    from .pipeline import QuantizeOptions, QuantizeReport, quantize
    from .publish import PushResult, push
    from .relayout import fuse, unfuse
    from .source import read_metadata, resolve_model
    from .verify import ParityReport, verify

_LAZY = {  # public name -> the module that defines it
    "ModelSummary": "inspection",
    "inspect_model": "inspection",
    "CheckReport": "manifest",
    "check": "manifest",
    "QuantizeOptions": "pipeline",
    "QuantizeReport": "pipeline",
    "quantize": "pipeline",
    "PushResult": "publish",
    "push": "publish",
    "fuse": "relayout",
    "unfuse": "relayout",
    "read_metadata": "source",
    "resolve_model": "source",
    "ParityReport": "verify",
    "verify": "verify",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """The package, with one guard: importing the submodule ``moeconvert.verify`` binds it as the
    package's ``verify`` attribute, over the function of that name. That binding is skipped, so
    ``moeconvert.verify`` is always the function, however the submodule was first imported."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _LAZY and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "BadInputError",
    "CheckFailedError",
    "CheckReport",
    "CorruptCheckpointError",
    "ModelNotFoundError",
    "ModelSummary",
    "MoeConvertError",
    "OutputExistsError",
    "ParityReport",
    "PushFailedError",
    "PushResult",
    "QuantizeOptions",
    "QuantizeReport",
    "Rule",
    "Scheme",
    "UnsupportedModelError",
    "__version__",
    "check",
    "fuse",
    "inspect_model",
    "push",
    "quantize",
    "read_metadata",
    "resolve_model",
    "unfuse",
    "verify",
]
