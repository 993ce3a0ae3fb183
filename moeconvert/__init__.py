"""moeconvert: load, re-layout, quantize, verify and publish Mixture-of-Experts checkpoints.

Every pass streams one decoder layer at a time, so peak memory is about one layer whatever the size of
the model. The command line (``moeconvert``) is a thin shell over these functions.
"""

from __future__ import annotations

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
from .inspection import ModelSummary, inspect_model
from .manifest import CheckReport, check
from .pipeline import QuantizeOptions, QuantizeReport, quantize
from .publish import PushResult, push
from .quant.scheme import Scheme
from .quant.targets import Rule
from .relayout import fuse, unfuse
from .source import read_metadata, resolve_model
from .verify import ParityReport, verify

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
