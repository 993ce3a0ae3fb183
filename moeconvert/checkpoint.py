"""Sharded safetensors checkpoints: a lazy reader that hands out one decoder layer at a time, and a
streaming writer whose memory use is one layer, not one shard.

The writer is given a *plan* (every output tensor's name, dtype and shape, grouped by layer) before any
data exists. With the plan, shard boundaries, shard names and each shard's header are known up front,
so tensor bytes can be appended to the open shard as each layer is computed and then dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from .errors import CorruptCheckpointError, MoeConvertError, OutputExistsError
from .safetensors_header import DTYPE_SIZES, TensorMeta, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
EXPERT_RE = re.compile(r"\.experts\.(\d+)\.")

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


def layer_index(name: str) -> int | None:
    """Decoder layer number of a tensor name, or None for embeddings, final norm and head."""
    match = LAYER_RE.match(name)
    return int(match.group(1)) if match else None


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, as the Hub tools count shard sizes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"invalid size {text!r}: use e.g. 5GB, 500MB or a number of bytes")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0])
    return int(number * base**power)


class ShardedReader:
    """Lazy view of a safetensors checkpoint folder (single file or sharded with an index).

    Opening reads and checks only the headers; tensor bytes are read when asked for, so peak memory
    is whatever the caller holds at once (one layer, in every pass of this package).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.files = _weight_files(self.folder)
        self.metas: dict[str, TensorMeta] = {}
        for file in self.files:
            for name, meta in read_header(self.folder / file).items():
                if name in self.metas:
                    raise CorruptCheckpointError(
                        f"tensor {name!r} appears in both {self.metas[name].file} and {file}"
                    )
                self.metas[name] = meta
        self._check_index_matches_headers()

    def _check_index_matches_headers(self) -> None:
        index = self.folder / INDEX_NAME
        if not index.exists():
            return
        for name, file in _read_index(index).items():
            meta = self.metas.get(name)
            if meta is None or meta.file != file:
                raise CorruptCheckpointError(
                    f"{INDEX_NAME} maps {name!r} to {file!r}, which does not hold it"
                )

    def __enter__(self) -> ShardedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open between reads; kept so callers can use the reader as a context."""

    @property
    def total_bytes(self) -> int:
        return sum(meta.nbytes for meta in self.metas.values())

    def layer_names(self) -> dict[int | None, list[str]]:
        """Tensor names grouped by decoder layer (key None: tensors outside the layers), sorted."""
        groups: dict[int | None, list[str]] = {}
        for name in sorted(self.metas):
            groups.setdefault(layer_index(name), []).append(name)
        return groups

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]

    def get_many(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Read tensors, opening each shard only for the call: safetensors maps whole files, and a
        mapping kept open would let touched pages pile up in RSS across layers."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.metas[name].file, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, members in by_file.items():
            try:
                with safe_open(str(self.folder / file), framework="pt") as handle:
                    for name in members:
                        out[name] = handle.get_tensor(name)
            except (SafetensorError, OSError) as err:  # changed since the headers were checked
                raise CorruptCheckpointError(f"{file}: cannot read tensors ({_first_line(err)})") from None
            for name in members:
                check_finite(name, out[name])
        return {name: out[name] for name in names}

    def meta_tensors(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Shape/dtype-only stand-ins (device 'meta'), for planning a conversion without reading data."""
        return {
            n: torch.empty(self.metas[n].shape, dtype=TORCH_DTYPES[self.metas[n].dtype], device="meta")
            for n in names
        }


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Refuse NaN or Inf in a floating-point weight, naming where it is.

    One non-finite weight turns every activation it touches into NaN, so a damaged checkpoint would
    quantize or convert "fine" and fail only when served. The common case costs one reduction per
    tensor (see :func:`_maybe_nonfinite`); the element-wise search runs only for a suspect tensor.
    Packed integer tensors are skipped.
    """
    if not tensor.is_floating_point() or not _maybe_nonfinite(tensor):
        return
    # float8_e4m3fn has no infinities (and torch has no isfinite for it), only NaN.
    finite = ~tensor.isnan() if tensor.dtype == torch.float8_e4m3fn else tensor.isfinite()
    if bool(finite.all()):
        return  # a sum that overflowed, not a bad weight
    flat = int((~finite).reshape(-1).to(torch.uint8).argmax())
    value = float(tensor.reshape(-1)[flat].float())
    index = [int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(tensor.shape))]
    kind = "NaN" if math.isnan(value) else ("Inf" if value > 0 else "-Inf")
    raise CorruptCheckpointError(
        f"{kind} in {name}{_where(name, tensor, index)}{f' at {index}' if index else ''}: the weights are "
        "damaged; re-download or re-export the checkpoint"
    )


# Smallest byte (sign bit clear) that is NaN or Inf in each FP8 format: every byte from it up is.
_FP8_NONFINITE = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def _maybe_nonfinite(tensor: torch.Tensor) -> bool:
    """A sum holds NaN or Inf if any element does, and a reduction runs ~50x faster than the
    element-wise ``isfinite(t).all()`` (CPU, one thread: ~20 vs ~0.3 GB/s for bf16), which matters at
    hundreds of GB per model. False alarms (a sum that overflows) are settled by the exact check.
    FP8 has no sum kernel: its non-finite bytes are the largest values of its int8 view (sign clear)
    and of its uint8 view (sign set)."""
    limit = _FP8_NONFINITE.get(tensor.dtype)
    if limit is None:
        return not bool(torch.isfinite(tensor.sum()))
    if tensor.numel() == 0:
        return False
    return int(tensor.view(torch.int8).max()) >= limit or int(tensor.view(torch.uint8).max()) >= 0x80 + limit


def _where(name: str, tensor: torch.Tensor, index: list[int]) -> str:
    """' (layer 2, expert 3)': per-expert names carry the expert; stacked [E, ...] experts, their row."""
    layer, expert = layer_index(name), EXPERT_RE.search(name)
    parts = [] if layer is None else [f"layer {layer}"]
    if expert is not None:
        parts.append(f"expert {expert.group(1)}")
    elif ".experts." in name and tensor.dim() == 3:
        parts.append(f"expert {index[0]}")
    return f" ({', '.join(parts)})" if parts else ""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        reason = _first_line(err)
        raise CorruptCheckpointError(f"{index.name} is not a valid safetensors index ({reason})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpointError(f"{index.name}: weight_map must map tensor names to file names")
    return weight_map


def _weight_files(folder: Path) -> list[str]:
    """Shard file names of a checkpoint, checked to exist and to lie inside the folder."""
    index = folder / INDEX_NAME
    if index.exists():
        files = sorted(set(_read_index(index).values()))
        if not files:
            raise CorruptCheckpointError(f"{INDEX_NAME} names no weight files (empty weight_map)")
    elif (folder / SINGLE_NAME).exists():
        files = [SINGLE_NAME]
    else:
        raise CorruptCheckpointError(f"{folder}: no {INDEX_NAME} or {SINGLE_NAME} found")
    for file in files:
        # A plain file name, never a path: the HF cache links shards to blobs elsewhere, so
        # containment is checked on the name, not on the resolved target.
        if Path(file).name != file or file in (".", "..") or "\\" in file:
            raise CorruptCheckpointError(f"{INDEX_NAME} names {file!r}, which is outside the model folder")
        if not _is_file(folder / file):
            raise CorruptCheckpointError(f"{INDEX_NAME} names {file!r}, which is missing from {folder}")
    return files


def _is_file(path: Path) -> bool:
    """``Path.is_file`` that says False, not raises, for names the OS rejects (too long, bad bytes)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[SAFETENSORS_DTYPES[self.dtype]]


def plan_group(tensors: dict[str, torch.Tensor]) -> list[PlannedTensor]:
    """Plan entries for one group (layer) of output tensors, in name order for determinism."""
    return [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in sorted(tensors.items())]


def split_into_shards(groups: Sequence[Sequence[PlannedTensor]], max_shard_size: int) -> list[list[int]]:
    """Pack consecutive groups into shards of at most ``max_shard_size`` bytes, closing only at group
    boundaries (a group larger than the cap gets a shard of its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, group in enumerate(groups):
        group_size = sum(t.nbytes for t in group)
        if shards[-1] and size + group_size > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += group_size
    return shards if shards[0] else []


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardedWriter:
    """Writes a planned checkpoint group by group into ``folder`` (normally a staging folder).

    Call :meth:`write_group` once per group, in plan order; each shard's header is written when its
    first group arrives and the file is closed after its last. :meth:`finish` writes the index.
    """

    def __init__(self, folder: Path, groups: Sequence[Sequence[PlannedTensor]], max_shard_size: int) -> None:
        self.folder = Path(folder)
        self.groups = [list(g) for g in groups]
        self.shards = split_into_shards(self.groups, max_shard_size)
        self.names = shard_names(len(self.shards))
        self.shard_of_group = {g: s for s, members in enumerate(self.shards) for g in members}
        self._next_group = 0
        self._file: BinaryIO | None = None
        self._digest: hashlib._Hash | None = None
        self.digests: dict[str, str] = {}  # sha256 of each closed shard

    def write_group(self, index: int, tensors: dict[str, torch.Tensor]) -> int:
        """Append one group's tensors; they must match the plan exactly. Returns bytes written."""
        if index != self._next_group:
            raise RuntimeError(f"groups must be written in order: expected {self._next_group}, got {index}")
        plan = self.groups[index]
        if sorted(tensors) != [t.name for t in plan]:
            raise RuntimeError(f"group {index} does not match its plan")
        shard = self.shard_of_group[index]
        if self.shards[shard][0] == index:
            self._open_shard(shard)
        written = 0
        for planned in plan:
            tensor = tensors[planned.name]
            if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
                raise RuntimeError(
                    f"{planned.name}: computed {tensor.dtype}{list(tensor.shape)} differs from plan"
                )
            written += self._write_bytes(_tensor_bytes(tensor))
        if self.shards[shard][-1] == index:
            self._close_shard(shard)
        self._next_group += 1
        return written

    def _open_shard(self, shard: int) -> None:
        entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for g in self.shards[shard]:
            for planned in self.groups[g]:
                dtype = SAFETENSORS_DTYPES[planned.dtype]
                entries[planned.name] = {
                    "dtype": dtype,
                    "shape": list(planned.shape),
                    "data_offsets": [offset, offset + planned.nbytes],
                }
                offset += planned.nbytes
        header = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # keep tensor data 8-byte aligned
        self._file = (self.folder / self.names[shard]).open("wb")
        self._digest = hashlib.sha256()  # hashed as written: the manifest need not read shards again
        self._write_bytes(len(header).to_bytes(8, "little") + header)

    def _write_bytes(self, data: bytes | memoryview) -> int:
        assert self._file is not None and self._digest is not None
        self._file.write(data)
        self._digest.update(data)
        return len(data)

    def _close_shard(self, shard: int) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())  # complete on disk before the folder is renamed into place
        self._file.close()
        self._file = None
        assert self._digest is not None
        self.digests[self.names[shard]] = self._digest.hexdigest()

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        """Write the index (sharded outputs only), after every group has been written."""
        if self._next_group != len(self.groups):
            raise RuntimeError("finish() called before every group was written")
        if len(self.names) <= 1:
            return
        weight_map = {
            t.name: self.names[self.shard_of_group[g]] for g, group in enumerate(self.groups) for t in group
        }
        total = sum(t.nbytes for group in self.groups for t in group)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a CPU tensor, without a copy when it is already contiguous."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


# ------------------------------------------------------------------------------------------ output folder


class OutputFolder:
    """A staging folder that becomes ``final`` only when the work inside it has completed.

    Work happens in a hidden sibling ``.<name>.partial``; on success it is renamed into place (an old
    output, allowed by ``force``, is moved aside first and deleted last). Whatever was at ``final`` is
    untouched until then. On failure the staging folder is removed, except for a ``resumable`` run
    stopped by something other than bad input (Ctrl-C, a full disk, a crash): its finished work stays
    for the same command to pick up, and a later start reuses it unless ``force`` is given.
    """

    def __init__(self, final: Path, force: bool = False, resumable: bool = False) -> None:
        self.final = Path(final)
        self.force = force
        self.resumable = resumable
        self.staging = self.final.with_name(f".{self.final.name}.partial")

    def __enter__(self) -> Path:
        if self.final.exists() and not self.force:
            raise OutputExistsError(f"output {self.final} already exists (use --force to replace it)")
        if self.final.exists() and not self.final.is_dir():
            raise OutputExistsError(f"output {self.final} exists and is not a folder")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if self.staging.exists() and (self.force or not self.resumable):
            shutil.rmtree(self.staging)
        self.staging.mkdir(exist_ok=True)
        return self.staging

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            if not self.resumable or issubclass(exc_type, MoeConvertError):
                shutil.rmtree(self.staging, ignore_errors=True)
            return
        old = self.final.with_name(f".{self.final.name}.old")
        if self.final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.final, old)
        os.replace(self.staging, self.final)
        if old.exists():
            shutil.rmtree(old)


def iter_groups(reader: ShardedReader) -> Iterator[tuple[int | None, list[str]]]:
    """Tensor groups in streaming order: embeddings/head first, then layers in numeric order."""
    groups = reader.layer_names()
    if None in groups:
        yield None, groups[None]
    for layer in sorted(k for k in groups if k is not None):
        yield layer, groups[layer]


class PartsWriter:
    """Writes each layer as its own part file as soon as it is done, then assembles capped shards.

    Used where output shapes are only known once a layer is computed (quantization): every finished
    layer is safely on disk in ``<folder>/.parts``, and :meth:`assemble` streams the parts, one layer at a
    time, through a :class:`ShardedWriter` into the final shards.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.parts = self.folder / ".parts"
        self.parts.mkdir(exist_ok=True)

    def part_path(self, index: int) -> Path:
        return self.parts / f"{index:06d}.safetensors"

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self.part_path(index)
        tmp = path.with_suffix(".tmp")
        save_file(_unaliased(tensors), tmp, metadata={"format": "pt"})
        os.replace(tmp, path)

    def assemble(self, max_shard_size: int) -> dict[str, str]:
        """Turn the parts into ``model*.safetensors`` (+ index); returns each shard's sha256."""
        paths = sorted(self.parts.glob("*.safetensors"))
        plan = []
        for path in paths:
            metas = read_header(path)
            plan.append([PlannedTensor(n, TORCH_DTYPES[m.dtype], m.shape) for n, m in sorted(metas.items())])
        writer = ShardedWriter(self.folder, plan, max_shard_size)
        try:
            for index, path in enumerate(paths):
                with safe_open(str(path), framework="pt") as handle:
                    tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
                writer.write_group(index, tensors)
        finally:
            writer.abort()
        writer.finish()
        shutil.rmtree(self.parts)
        return writer.digests


def _unaliased(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each with its own memory: safetensors refuses to save two names for one
    tensor (e.g. the shared act-order ``g_idx`` of an expert's gate and up projections)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.contiguous()
        if tensor.numel() and tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        out[name] = tensor
    return out


class HeaderReader(ShardedReader):
    """A reader over tensor headers alone (e.g. fetched from the Hub with range requests): it can plan a
    conversion (names, shapes, dtypes) but holds no data, so a dry run downloads no weights."""

    def __init__(self, metas: dict[str, TensorMeta], transform: Callable[[dict], dict] | None = None) -> None:
        self.folder = Path()
        self.files = sorted({m.file for m in metas.values()})
        self.metas = dict(metas)
        self.transform = transform

    def get_many(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        raise RuntimeError("a header-only reader holds no tensor data")

    def meta_tensors(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        tensors = super().meta_tensors(names)
        return self.transform(tensors) if self.transform else tensors
