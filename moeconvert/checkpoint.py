"""Sharded safetensors checkpoints: a lazy reader that hands out one decoder layer at a time, and a
streaming writer whose memory use is one layer, not one shard.

The writer is given a *plan* (every output tensor's name, dtype and shape, grouped by layer) before any
data exists. With the plan, shard boundaries, shard names and each shard's header are known up front,
so tensor bytes can be appended to the open shard as each layer is computed and then dropped.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from .errors import CorruptCheckpointError
from .safetensors_header import DTYPE_SIZES, MAX_HEADER_BYTES, TensorMeta, read_header
from .shard_digest import GrowingFileDigest, HashBacklog, hash_workers
from .writeback import WritebackBehind

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Decoder layers sit under ``model.`` or, in a vision-language checkpoint, its ``model.language_model.``
# (Llama 4's, a causal LM inside, ``language_model.model.`` with its head ``language_model.lm_head``);
# Nemotron-H's releases call the text model ``backbone.``
LAYER_RE = re.compile(r"^(?:model\.(?:language_model\.)?|language_model\.model\.|backbone\.)layers\.(\d+)\.")
TEXT_MODEL = "model.language_model."
INNER_LM = "language_model."
BACKBONE = "backbone."
# encoders beside the text model, carried as they are, never run: Qwen's, Gemma 4's and its projections
TOWERS = (
    "model.visual.",
    "model.vision_tower.",
    "model.embed_vision.",
    "model.audio_tower.",
    "model.embed_audio.",
    "vision_model.",  # Llama 4's
    "multi_modal_projector.",
)
EXPERT_RE = re.compile(r"\.experts\.(\d+)\.")
PREFETCH_BYTES = 1 << 30  # read ahead of a streaming pass, per file

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


def layer_prefix(name: str) -> str:
    """``model.layers.3.`` (or ``model.language_model.layers.3.``) of a tensor name inside a layer."""
    match = LAYER_RE.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not inside a decoder layer")
    return match.group(0)


def text_model_name(name: str) -> str:
    """The text model's own name of a checkpoint tensor: a vision-language checkpoint's
    ``model.language_model.norm.weight`` is the causal LM's ``model.norm.weight``, Nemotron-H's
    ``backbone.norm_f.weight`` its ``model.norm_f.weight``, Llama 4's ``language_model.lm_head.weight``
    its ``lm_head.weight``."""
    for prefix in (TEXT_MODEL, BACKBONE):
        if name.startswith(prefix):
            return "model." + name[len(prefix) :]
    return name.removeprefix(INNER_LM)


def is_tower(name: str) -> bool:
    """Whether a tensor belongs to an encoder beside the text model (a vision-language checkpoint's
    ``model.visual.*``): no command converts or runs it."""
    return name.startswith(TOWERS)


def is_mtp(name: str, num_layers: int) -> bool:
    """Whether a tensor belongs to a multi-token prediction module, which every command carries as it
    is: a decoder layer past ``num_layers`` (DeepSeek-V3, GLM), a block beside ``model`` and
    ``lm_head`` (Qwen3-Next's ``mtp.*``) or ERNIE-4.5's ``model.mtp_*`` modules."""
    index = layer_index(name)
    if index is not None:
        return index >= num_layers
    text = name.startswith(("model.", BACKBONE, INNER_LM, "lm_head.")) or is_tower(name)
    return name.startswith("model.mtp_") or not text


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

    With ``views`` set, :meth:`get_many` hands out views of copy-on-write mappings of the files instead
    of copies: nothing is copied or allocated, and the pages stay in the OS's cache. One mapping serves
    all tensors of one call from one file and is unmapped only when the last of them is gone, so set
    it only where whole groups are dropped together (``fuse``/``unfuse``); a caller that kept one small
    tensor per layer would keep every layer's pages in its RSS.
    """

    views: bool = False

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.files = _weight_files(self.folder)
        self._spans: dict[str, dict[str, tuple[int, int]]] = {}  # file -> tensor -> absolute byte range
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
        mapping kept open would let touched pages pile up in RSS across layers (with ``views``, each
        call's mapping lives as long as its tensors). Every floating-point tensor is checked for
        NaN/Inf (:func:`check_finite`)."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.metas[name].file, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, members in by_file.items():
            try:
                out.update(self._map(file, members) if self.views else self._copy(file, members))
            except (SafetensorError, OSError, ValueError) as err:  # changed since the headers were checked
                raise CorruptCheckpointError(f"{file}: cannot read tensors ({_first_line(err)})") from None
            for name in members:
                check_finite(name, out[name])
        return {name: out[name] for name in names}

    def prefetch(self, names: Sequence[str]) -> None:
        """Ask the OS to start reading these tensors' bytes into its cache (best effort: nothing is
        mapped or held here). Streaming passes call it for the next layer, so that reading it from disk
        overlaps with writing this one; at most PREFETCH_BYTES per file, so that a layer larger than the
        free memory cannot push the current one out of the cache."""
        if not hasattr(os, "posix_fadvise"):
            return
        try:
            for file, (begin, end) in self._ranges(names).items():
                if end > begin:  # a length of 0 would mean the whole file
                    with open(self.folder / file, "rb") as handle:
                        size = min(end - begin, PREFETCH_BYTES)
                        os.posix_fadvise(handle.fileno(), begin, size, os.POSIX_FADV_WILLNEED)
        except (OSError, ValueError):
            return  # only a hint: get_many reports a real problem

    def _ranges(self, names: Sequence[str]) -> dict[str, tuple[int, int]]:
        """The byte range of each file that holds ``names``, from the first of them to the last."""
        ranges: dict[str, tuple[int, int]] = {}
        for name in names:
            file = self.metas[name].file
            begin, end = self._span(file, name)
            low, high = ranges.get(file, (begin, end))
            ranges[file] = (min(low, begin), max(high, end))
        return ranges

    def _copy(self, file: str, names: list[str]) -> dict[str, torch.Tensor]:
        with safe_open(str(self.folder / file), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in names}

    def _map(self, file: str, names: list[str]) -> dict[str, torch.Tensor]:
        """Views of one private (copy-on-write) mapping of the bytes that hold ``names``: writing to a
        tensor copies that page, never changes the file. The file is checked to still hold the bytes, as
        reading past its end through a mapping would kill the process (SIGBUS) instead of raising."""
        begin, end = self._ranges(names)[file]
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        mapping = None
        if end > begin:
            with open(self.folder / file, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size < end:
                    raise ValueError(f"{size} bytes, but its header places tensor data up to byte {end}")
                mapping = mmap.mmap(handle.fileno(), end - start, access=mmap.ACCESS_COPY, offset=start)
        return {name: self._view(mapping, self._span(file, name)[0] - start, name) for name in names}

    def _view(self, mapping: mmap.mmap | None, offset: int, name: str) -> torch.Tensor:
        meta = self.metas[name]
        dtype = TORCH_DTYPES[meta.dtype]
        if meta.numel == 0 or mapping is None:
            return torch.empty(meta.shape, dtype=dtype)
        tensor = torch.frombuffer(mapping, dtype=dtype, count=meta.numel, offset=offset).view(meta.shape)
        return tensor if offset % tensor.element_size() == 0 else tensor.clone()  # keep elements aligned

    def _span(self, file: str, name: str) -> tuple[int, int]:
        """Absolute byte range of one tensor in its file, from the header read again (``TensorMeta``
        keeps no offsets); checked against the header read at opening, in case the file changed."""
        if file not in self._spans:
            self._spans[file] = _data_spans(self.folder / file)
        span = self._spans[file].get(name)
        if span is None or span[1] - span[0] != self.metas[name].nbytes:
            raise ValueError(f"{name!r} is no longer where its header said")
        return span

    def meta_tensors(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Shape/dtype-only stand-ins (device 'meta'), for planning a conversion without reading data."""
        return {
            n: torch.empty(self.metas[n].shape, dtype=TORCH_DTYPES[self.metas[n].dtype], device="meta")
            for n in names
        }


def _data_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's absolute byte range in a safetensors file whose header was checked before (a
    ValueError if it no longer parses: the file changed since)."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        raw = handle.read(min(length, MAX_HEADER_BYTES))
    try:
        header = json.loads(raw)
        return {
            name: (8 + length + entry["data_offsets"][0], 8 + length + entry["data_offsets"][1])
            for name, entry in header.items()
            if name != "__metadata__"
        }
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        raise ValueError("its header changed since it was checked") from None


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


def index_files(index: Path) -> list[str]:
    """The shard names a safetensors index lists, each checked to be a plain file name (never a path:
    the HF cache links shards to blobs elsewhere, so containment is checked on the name, not on the
    resolved target) and free of glob characters (a Hub download takes names as patterns: ``*`` would
    fetch the whole repository)."""
    files = sorted(set(_read_index(index).values()))
    if not files:
        raise CorruptCheckpointError(f"{INDEX_NAME} names no weight files (empty weight_map)")
    for file in files:
        if Path(file).name != file or file in (".", "..") or "\\" in file:
            raise CorruptCheckpointError(f"{INDEX_NAME} names {file!r}, which is outside the model folder")
        if any(c in file for c in "*?[]"):
            raise CorruptCheckpointError(f"{INDEX_NAME} names {file!r}, which is a pattern, not a file name")
    return files


def _weight_files(folder: Path) -> list[str]:
    """Shard file names of a checkpoint, checked to exist and to lie inside the folder."""
    index = folder / INDEX_NAME
    if index.exists():
        files = index_files(index)
    elif (folder / SINGLE_NAME).exists():
        files = [SINGLE_NAME]
    else:
        raise CorruptCheckpointError(f"{folder}: no {INDEX_NAME} or {SINGLE_NAME} found")
    for file in files:
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


@dataclass(frozen=True, eq=False)
class Concatenated:
    """A tensor that is never built: the bytes of ``parts`` one after another, read as ``dtype`` and
    ``shape``. Stacked experts are exactly that (``[E, out, in]`` is each expert's ``[out, in]`` in turn),
    so :class:`ShardedWriter` writes them from the experts themselves, with no copy and no memory."""

    parts: tuple[torch.Tensor, ...]
    dtype: torch.dtype
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        size = sum(p.numel() for p in self.parts)
        if size != math.prod(self.shape) or any(p.dtype != self.dtype for p in self.parts):
            raise ValueError(f"parts do not make one {self.dtype}{list(self.shape)} tensor")

    def materialize(self) -> torch.Tensor:
        """The tensor itself, for a caller that needs one (a copy)."""
        return torch.cat([p.reshape(-1) for p in self.parts]).view(self.shape)


CHUNK_BYTES = 16 << 20  # bytes between reports of progress to a shard's hashing thread
# Size of one write() call. From 2 MiB up, Linux fills the page cache with 2 MiB folios, taken from
# whole free 2 MiB blocks; on a VM whose balloon reports free memory to the host, those blocks fault
# back in at ~0.4 GB/s (2 GB written in 2 MiB calls: 10.5 s; in 1 MiB calls: 1.0 s, on our CI VM).
WRITE_BYTES = 1 << 20


class ShardedWriter:
    """Writes a planned checkpoint group by group into ``folder`` (normally a staging folder).

    Call :meth:`write_group` once per group, in plan order; each shard's header is written when its
    first group arrives and the file is closed after its last. :meth:`finish` writes the index.

    The copy into the file, the sha256 of what is written (for the manifest) and each shard's fsync
    are the three costs of writing, and none waits for another: each shard is hashed on a thread of
    its own that reads it back from the page cache right behind the writes (so shards are hashed on as
    many cores as are free, see :mod:`.shard_digest`; the writer waits only if more than
    ``MAX_UNHASHED_BYTES`` await their hash), its writeback to disk is started behind the writes too
    (:mod:`.writeback`), and a closed shard is fsynced while the next one is written. :meth:`finish`
    returns only when every shard is hashed and on disk.
    """

    def __init__(
        self,
        folder: Path,
        groups: Sequence[Sequence[PlannedTensor]],
        max_shard_size: int,
        done: dict[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.groups = [list(g) for g in groups]
        self.shards = split_into_shards(self.groups, max_shard_size)
        self.names = shard_names(len(self.shards))
        self.shard_of_group = {g: s for s, members in enumerate(self.shards) for g in members}
        # shards already complete on disk (a resumed assembly), by name: their groups are not written again
        self.done = dict(done or {})
        self._next_group = self._after_done(0)
        self._reported: set[int] = set()  # shards that finished_shards() has handed out
        self._file: BinaryIO | None = None
        self._digest: GrowingFileDigest | None = None  # of the open shard
        self._writeback: WritebackBehind | None = None  # of the open shard
        self._hasher = ThreadPoolExecutor(hash_workers(len(self.shards)), thread_name_prefix="sha256")
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="fsync")
        self._hashing: dict[str, Future[str]] = {}  # shard -> its sha256
        self.backlog = HashBacklog()  # written bytes not yet hashed: the writer waits past its limit
        self._closing: list[Future[None]] = []  # each shard's fsync and close
        self._closed_names: list[str] = []  # the shard of each of those
        self.digests: dict[str, str] = {}  # sha256 of each shard, complete after finish()

    def write_group(self, index: int, tensors: dict[str, torch.Tensor | Concatenated]) -> int:
        """Append one group's tensors; they must match the plan exactly. Returns bytes written.

        The tensors are no longer referenced when this returns (their bytes are in the page cache)."""
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
            for chunk in _chunks(tensor):
                written += self._write_bytes(chunk)
        if self.shards[shard][-1] == index:
            self._close_shard(shard)
        self._next_group = self._after_done(index + 1)
        return written

    def writes(self, index: int) -> bool:
        """Whether group ``index`` is to be written (its shard is not already done)."""
        return self.names[self.shard_of_group[index]] not in self.done

    def _after_done(self, index: int) -> int:
        while index < len(self.groups) and not self.writes(index):
            index += 1
        return index

    def finished_shards(self) -> list[tuple[int, str]]:
        """Shards closed, fsynced and hashed since the last call, as (shard, sha256): from here on their
        groups' sources are no longer needed. Does not wait: a shard still syncing comes in a later call
        (after :meth:`finish`, all of them). Raises a failed fsync's OSError."""
        finished = []
        for closing, name in zip(self._closing, self._closed_names, strict=True):
            shard, hashing = self.names.index(name), self._hashing[name]
            if shard in self._reported or not (closing.done() and hashing.done()):
                continue
            closing.result()
            self._reported.add(shard)
            finished.append((shard, hashing.result()))
        return finished

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
        path = self.folder / self.names[shard]
        self._file = path.open("wb")
        self._writeback = WritebackBehind(self._file.fileno())
        # hashed behind the writes: the manifest reads no shard again
        self._digest = GrowingFileDigest(path, self.backlog)
        self._hashing[self.names[shard]] = self._hasher.submit(self._digest.run)
        self._write_bytes(len(header).to_bytes(8, "little") + header)

    def _write_bytes(self, data: bytes | memoryview) -> int:
        assert self._file is not None and self._digest is not None and self._writeback is not None
        view = memoryview(data)
        self.backlog.wait_for_room()
        for start in range(0, len(view), WRITE_BYTES):
            self._file.write(view[start : start + WRITE_BYTES])
        self._file.flush()  # the hashing thread reads the file through its own descriptor
        self._digest.advance(self._file.tell())
        self._writeback.written(self._file.tell())
        return len(data)

    def _close_shard(self, shard: int) -> None:
        assert self._file is not None and self._digest is not None
        self._file.flush()
        self._digest.close()
        self._closing.append(self._syncer.submit(_sync_and_close, self._file))
        self._closed_names.append(self.names[shard])
        self._file = self._digest = self._writeback = None

    def abort(self) -> None:
        """Close the open shard and wait for the worker threads (after an error; harmless after success)."""
        if self._digest is not None:
            self._digest.close()  # its thread hashes what was written and ends
            self._digest = None
        if self._file is not None:
            self._file.close()
            self._file = self._writeback = None
        self._hasher.shutdown()
        self._syncer.shutdown()

    def finish(self) -> None:
        """Wait until every shard is hashed, fsynced and closed (raising a failed fsync's OSError), then
        write the index (sharded outputs only). Call it after every group has been written."""
        if self._next_group != len(self.groups):
            raise RuntimeError("finish() called before every group was written")
        self.abort()
        for closing in self._closing:
            closing.result()
        self.digests = {name: self.done.get(name) or self._hashing[name].result() for name in self.names}
        if len(self.names) <= 1:
            return
        weight_map = {
            t.name: self.names[self.shard_of_group[g]] for g, group in enumerate(self.groups) for t in group
        }
        total = sum(t.nbytes for group in self.groups for t in group)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _sync_and_close(file: BinaryIO) -> None:
    """On the fsync thread: the shard is complete on disk before the folder is renamed into place."""
    try:
        os.fsync(file.fileno())
    finally:
        file.close()


def _chunks(tensor: torch.Tensor | Concatenated) -> Iterator[memoryview]:
    """A tensor's raw bytes in pieces of at most CHUNK_BYTES (a Concatenated's parts in turn)."""
    for part in tensor.parts if isinstance(tensor, Concatenated) else (tensor,):
        data = _tensor_bytes(part)
        for start in range(0, len(data), CHUNK_BYTES):
            yield data[start : start + CHUNK_BYTES]


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a CPU tensor, without a copy when it is already contiguous."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def iter_groups(reader: ShardedReader) -> Iterator[tuple[int | None, list[str]]]:
    """Tensor groups in streaming order: embeddings/head first, then layers in numeric order."""
    groups = reader.layer_names()
    if None in groups:
        yield None, groups[None]
    for layer in sorted(k for k in groups if k is not None):
        yield layer, groups[layer]


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
