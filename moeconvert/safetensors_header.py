"""Read and check safetensors headers without touching tensor data.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw bytes. Reading only the header lets ``inspect`` count
parameters of a 671B model in milliseconds, and checking it up front turns a truncated download
or a hostile file into a one-line error instead of a crash deep inside a conversion.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInputError, CorruptCheckpointError

# Bytes per element of every dtype safetensors defines that torch can hold.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives and what it is, as declared by its file's header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str  # file name relative to the checkpoint folder

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


def parse_header(raw: bytes, file: str, data_size: int | None) -> dict[str, TensorMeta]:
    """Decode a JSON header and check every entry; ``data_size`` (bytes after the header) if known.

    The rules are safetensors' own (UTF-8 JSON without NaN, string metadata, exact byte ranges that
    cover the data), so a header that passes here also opens in ``safe_open`` later, mid-conversion.
    """
    header = _decode(raw, file)
    metas: dict[str, TensorMeta] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            _check_metadata(entry, file)
            continue
        meta, begin, end = _check_entry(name, entry, file)
        metas[name] = meta
        spans.append((begin, end, name))
    _check_spans(spans, file, data_size)
    return metas


def _decode(raw: bytes, file: str) -> dict[str, object]:
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CorruptCheckpointError(f"{file}: safetensors header is not valid JSON ({reason})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{file}: safetensors header is not a JSON object")
    return header


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _check_metadata(entry: object, file: str) -> None:
    if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
        raise CorruptCheckpointError(f"{file}: __metadata__ must map strings to strings")


def _is_size(value: object) -> bool:
    """A JSON integer that fits an unsigned 64-bit size (``True`` is an int to Python, not to JSON)."""
    return type(value) is int and 0 <= value < 2**64


def _check_entry(name: str, entry: object, file: str) -> tuple[TensorMeta, int, int]:
    if not name.isprintable():  # no checkpoint needs them, and they would break one-line messages
        raise CorruptCheckpointError(f"{file}: tensor name {name!r} contains control characters")
    if not isinstance(entry, dict):
        raise CorruptCheckpointError(f"{file}: header entry for {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CorruptCheckpointError(
            f"{file}: tensor {name!r} has unsupported dtype {dtype!r} (readable: {', '.join(DTYPE_SIZES)})"
        )
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape) or math.prod(shape) >= 2**64:
        raise CorruptCheckpointError(f"{file}: tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_size(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CorruptCheckpointError(f"{file}: tensor {name!r} has invalid data_offsets {offsets!r}")
    meta = TensorMeta(name, dtype, tuple(shape), file)
    if offsets[1] - offsets[0] != meta.nbytes:
        raise CorruptCheckpointError(
            f"{file}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes but its shape needs {meta.nbytes}"
        )
    return meta, offsets[0], offsets[1]


def _check_spans(spans: list[tuple[int, int, str]], file: str, data_size: int | None) -> None:
    """Tensors must tile the data section exactly: no overlap, no gap, nothing past the end of file."""
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise CorruptCheckpointError(f"{file}: tensor {name!r} overlaps or leaves a gap in the data")
        position = end
    if data_size is not None and position > data_size:
        raise CorruptCheckpointError(
            f"{file}: header declares {position} bytes of data but the file holds {data_size} "
            "(truncated download? delete it and fetch it again)"
        )
    if data_size is not None and position < data_size:
        raise CorruptCheckpointError(
            f"{file}: {data_size - position} bytes follow the last tensor (not a safetensors file as written)"
        )


def read_header(path: Path) -> dict[str, TensorMeta]:
    """Read and check the header of a local safetensors file (reads only the header bytes)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CorruptCheckpointError(
                    f"{path.name}: file is too short to be safetensors ({size} bytes)"
                )
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise CorruptCheckpointError(
                    f"{path.name}: header claims {length} bytes, larger than the file ({size} bytes)"
                )
            raw = f.read(length)
    except OSError as err:
        raise BadInputError(f"{path.name}: cannot read it ({err.strerror or type(err).__name__})") from None
    return parse_header(raw, path.name, size - 8 - length)
