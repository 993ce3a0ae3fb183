"""Fuzzing of the safetensors header and index parsers: whatever the bytes, either a result that holds
together or a one-line :class:`MoeConvertError`, never any other exception.

"Holds together" is checked against safetensors itself: a header we accept must open in ``safe_open``
with the dtypes and shapes we read from it, since every later pass reads the data that way.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save, save_file

from moeconvert.checkpoint import INDEX_NAME, TORCH_DTYPES, ShardedReader
from moeconvert.errors import MoeConvertError
from moeconvert.safetensors_header import DTYPE_SIZES, parse_header, read_header

FUZZ = settings(max_examples=200, deadline=None)

BASE_TENSORS = {
    "model.embed_tokens.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "model.layers.0.mlp.experts.0.w1.weight": torch.ones(4, dtype=torch.bfloat16),
    "model.layers.0.mlp.gate.weight": torch.arange(6, dtype=torch.int32).reshape(3, 2),
    "model.norm.weight": torch.zeros(0, dtype=torch.float16),
}
SHARDS = {
    "model-00001-of-00002.safetensors": ["model.embed_tokens.weight", "model.norm.weight"],
    "model-00002-of-00002.safetensors": ["model.layers.0.mlp.experts.0.w1.weight", "model.layers.0.mlp.gate.weight"],
}  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


BASE_FILE = save(BASE_TENSORS, metadata={"format": "pt"})
DATA_START = len(BASE_FILE) - sum(t.numel() * t.element_size() for t in BASE_TENSORS.values())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Module-scoped: hypothesis runs each test body many times in one function call."""
    return tmp_path_factory.mktemp("fuzz")


def _split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _pack(header: object, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _one_line(err: MoeConvertError) -> None:
    assert len(str(err).splitlines()) == 1, str(err)
    event(f"refused: {type(err).__name__}")


def _check_file(path: Path) -> None:
    """The property for one file: refused with a MoeConvertError, or readable exactly as parsed."""
    try:
        metas = read_header(path)
    except MoeConvertError as err:
        _one_line(err)
        return
    event("accepted")
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(metas)
        for name, meta in metas.items():
            tensor = handle.get_tensor(name)
            assert tuple(tensor.shape) == meta.shape and tensor.dtype == TORCH_DTYPES[meta.dtype]


mutations = st.lists(st.tuples(st.integers(0, len(BASE_FILE) - 1), st.integers(0, 255)), max_size=6)


@FUZZ
@given(flips=mutations, cut=st.none() | st.integers(0, len(BASE_FILE)), extra=st.binary(max_size=16))
def test_corrupted_file_bytes(
    workdir: Path, flips: list[tuple[int, int]], cut: int | None, extra: bytes
) -> None:
    """Random byte flips anywhere (length prefix, header, data), truncation and trailing bytes."""
    data = bytearray(BASE_FILE)
    for position, value in flips:
        data[position] = value
    path = workdir / "flipped.safetensors"
    path.write_bytes(bytes(data[:cut]) + extra)
    _check_file(path)


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(DATA_START, len(BASE_FILE) - 1), st.integers(0, 255)), max_size=6)
)
def test_flipped_weight_bytes(workdir: Path, flips: list[tuple[int, int]]) -> None:
    """Flips in the tensor data keep the header valid: the reader either hands out finite floats or
    names the NaN/Inf it found."""
    data = bytearray(BASE_FILE)
    for position, value in flips:
        data[position] = value
    folder = workdir / "single"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(bytes(data))
    try:
        tensors = ShardedReader(folder).get_many(sorted(BASE_TENSORS))
    except MoeConvertError as err:
        _one_line(err)
        assert str(err).startswith(("NaN in ", "Inf in ", "-Inf in ")), str(err)
        return
    event("accepted")
    assert all(bool(t.isfinite().all()) for t in tensors.values() if t.is_floating_point())


def _entry_strategy(meta: dict) -> st.SearchStrategy[dict]:
    """One header entry with some of its fields replaced by random (often nonsensical) JSON values."""
    dtypes = st.sampled_from([*DTYPE_SIZES, "Q4_K", "f32", "", "F8_E8M0"])
    sizes = st.lists(st.integers(-2, 2**65), max_size=3)
    fields = {
        "dtype": st.just(meta["dtype"]) | dtypes | json_values,
        "shape": st.just(meta["shape"]) | sizes | json_values,
        "data_offsets": st.just(meta["data_offsets"]) | sizes | json_values,
    }
    return st.fixed_dictionaries({}, optional=fields)


@st.composite
def headers(draw: Callable) -> tuple[object, bytes]:
    header, body = _split(BASE_FILE)
    fuzzed: dict[str, object] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            fuzzed[name] = draw(st.just(entry) | json_values)
        elif draw(st.booleans()):
            fuzzed[draw(st.just(name) | st.text(max_size=12))] = draw(_entry_strategy(entry) | json_values)
        else:
            fuzzed[name] = entry
    top = draw(st.just(fuzzed) | json_values)
    return top, body[: draw(st.integers(0, len(body)))] if draw(st.booleans()) else body


@FUZZ
@given(case=headers())
def test_random_header_values(workdir: Path, case: tuple[object, bytes]) -> None:
    """Random JSON for dtype, shape, data_offsets, names, metadata and the header as a whole."""
    header, body = case
    path = workdir / "random.safetensors"
    path.write_bytes(_pack(header, body))
    _check_file(path)


@FUZZ
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode), size=st.none() | st.integers(0, 64))
def test_parse_header_on_arbitrary_bytes(raw: bytes, size: int | None) -> None:
    """The header bytes alone (UTF-8 or not, JSON or not), with and without a known data size."""
    try:
        parse_header(raw, "x.safetensors", size)
    except MoeConvertError as err:
        _one_line(err)


# --------------------------------------------------------------------------------------------- the index


@pytest.fixture(scope="module")
def model_folder(workdir: Path) -> Path:
    """Two shards and a valid index, with a readable shard *outside* the folder to tempt ``../``."""
    folder = workdir / "model"
    folder.mkdir()
    for file, names in SHARDS.items():
        save_file({n: BASE_TENSORS[n] for n in names}, folder / file, metadata={"format": "pt"})
    save_file({"model.norm.weight": BASE_TENSORS["model.norm.weight"]}, workdir / "outside.safetensors")
    (folder / "sub").mkdir()
    return folder


VALID_INDEX = {"metadata": {"total_size": 0}, "weight_map": {n: f for f, ns in SHARDS.items() for n in ns}}
FILE_NAMES = [
    *SHARDS, "../outside.safetensors", "/etc/passwd", "", ".", "..", "sub", "sub/x.safetensors",
    "a\\b", "x" * 300, "nul\x00byte", "new\nline", INDEX_NAME,
]  # fmt: skip


def _check_folder(folder: Path) -> None:
    try:
        reader = ShardedReader(folder)
        tensors = reader.get_many(sorted(reader.metas))
    except MoeConvertError as err:
        _one_line(err)
        return
    event("accepted")
    assert all(Path(f).name == f and (folder / f).is_file() for f in reader.files)
    index = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    for name, file in index.items():
        assert reader.metas[name].file == file
    for name, tensor in tensors.items():
        assert torch.equal(tensor, BASE_TENSORS[name])


def _with_index(folder: Path, text: bytes) -> Path:
    """A fresh copy of the model folder with the given index bytes (shards shared by hard link)."""
    target = folder.parent / "case"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target, copy_function=lambda src, dst: Path(dst).hardlink_to(src))
    (target / INDEX_NAME).write_bytes(text)
    return target


weight_maps = st.sets(st.sampled_from(sorted(VALID_INDEX["weight_map"]))).map(
    lambda names: {n: VALID_INDEX["weight_map"][n] for n in sorted(names)}  # parts of a good map
) | st.dictionaries(
    st.sampled_from(sorted(BASE_TENSORS)) | st.text(max_size=10),
    st.sampled_from(FILE_NAMES) | st.text(max_size=10) | json_values,
    max_size=6,
)


@FUZZ
@given(
    index=st.fixed_dictionaries({"weight_map": weight_maps}, optional={"metadata": json_values})
    | st.fixed_dictionaries({}, optional={"weight_map": json_values, "metadata": json_values})
    | json_values
)
def test_random_index_contents(model_folder: Path, index: object) -> None:
    """Random weight maps: unknown tensors, missing and escaping file names, wrong types, no map at all."""
    _check_folder(_with_index(model_folder, json.dumps(index).encode()))


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4), cut=st.integers(0, 400)
)
def test_corrupted_index_bytes(model_folder: Path, flips: list[tuple[int, int]], cut: int) -> None:
    """Byte flips and truncation of a good index: invalid UTF-8 or JSON, names and files renamed."""
    data = bytearray(json.dumps(VALID_INDEX, indent=2).encode())
    for position, value in flips:
        if position < len(data):
            data[position] = value
    _check_folder(_with_index(model_folder, bytes(data[: max(cut, len(data) // 2)])))
