"""MODEL -> a local folder (or just its metadata), from a local path or the Hugging Face Hub.

A MODEL is a local folder or a Hub id ``org/name`` with an optional ``@revision``. Hub downloads go
through ``huggingface_hub`` so its cache, ``HF_TOKEN``/saved login, ``HF_HUB_OFFLINE`` and
``HF_ENDPOINT`` all behave as users expect; only the files a conversion needs are fetched (config,
generation config, tokenizer and chat template, the safetensors index and the shards it names). A Hub
that does not accept a connection is told apart in one quick try, and the cache is used as if
``HF_HUB_OFFLINE`` were set: a cached model works without the network, and an uncached one fails at
once, not after the client's retries (about 25 s of them).
Pickle weights are never downloaded or loaded, and no remote code is ever run.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import importlib
import json
import logging
import os
import re
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors

from .checkpoint import INDEX_NAME, SINGLE_NAME, index_files
from .errors import BadInputError, CorruptCheckpointError, ModelNotFoundError, UnsupportedModelError
from .safetensors_header import DTYPE_SIZES, TensorMeta, read_header

# Files that travel with a converted checkpoint besides its weights.
SIDE_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.tiktoken",
    "chat_template.json",
    "chat_template.jinja",
    # a vision-language model's processor (AutoProcessor, and vLLM serving it, read them)
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)
CARD_NAME = "README.md"  # the source's model card: read for its license, never copied
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PROBE_SECONDS = 5.0  # to open a connection to the Hub before it is taken to be unreachable
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """A parsed MODEL argument: exactly one of ``folder`` and ``repo_id`` is set."""

    text: str
    folder: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        if self.repo_id:
            return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id
        return str(self.folder)


@dataclass
class ModelMetadata:
    """What is known about a checkpoint without reading its weights."""

    ref: ModelRef
    config: dict[str, Any]
    tensors: dict[str, TensorMeta]
    files: list[str] = field(default_factory=list)  # weight files

    @property
    def weight_bytes(self) -> int:
        return sum(meta.nbytes for meta in self.tensors.values())


def parse_model_ref(model: str, revision: str | None = None) -> ModelRef:
    """Tell a local folder from a Hub id; ``org/name@rev`` carries its revision (``revision`` wins)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BadInputError(f"{model} is a file; MODEL must be a checkpoint folder or a Hub id")
        return ModelRef(model, folder=path)
    repo_id, _, at_revision = model.partition("@")
    if HUB_ID_RE.match(repo_id) and not model.startswith((".", "/", "~")):
        return ModelRef(model, repo_id=repo_id, revision=revision or at_revision or None)
    raise ModelNotFoundError(f"{model}: no such folder, and not a Hub id of the form org/name[@revision]")


def side_files(folder: Path) -> list[Path]:
    """Config, tokenizer and chat-template files present in a checkpoint folder, sorted."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in SIDE_FILE_PATTERNS)
    )


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise BadInputError(f"{folder} has no config.json; is it a transformers checkpoint?")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BadInputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise BadInputError(f"{path}: expected a JSON object")
    return config


def resolve_model(model: str, revision: str | None = None, token: str | None = None) -> Path:
    """A local folder holding the checkpoint: the folder itself, or a Hub snapshot in the HF cache."""
    ref = parse_model_ref(model, revision)
    if ref.folder is not None:
        _require_safetensors(ref.folder, ref)
        return ref.folder
    return _download(ref, token)


def describe_source(model: str, folder: Path | None, revision: str | None = None) -> dict[str, Any]:
    """Where a conversion came from, for its model card: the Hub id (also for a local folder that is a
    snapshot in the Hugging Face cache), the commit, and the license stated in the source's own card."""
    ref = parse_model_ref(model, revision)
    repo_id, commit = ref.repo_id, ref.revision
    if folder is not None:
        match = re.search(r"models--([^/]+)--([^/]+)/snapshots/([0-9a-f]{40})$", folder.resolve().as_posix())
        if match:
            repo_id, commit = repo_id or f"{match[1]}/{match[2]}", match[3]
    info: dict[str, Any] = {"model": str(ref), "id": repo_id, "revision": commit}
    card = folder / CARD_NAME if folder is not None else None
    if card is not None and card.is_file():
        try:
            meta = huggingface_hub.metadata_load(card) or {}
        except Exception:  # a malformed card only costs the license line
            meta = {}
        info.update({k: meta[k] for k in ("license", "license_name", "license_link") if k in meta})
    return info


def read_metadata(model: str, revision: str | None = None, token: str | None = None) -> ModelMetadata:
    """Config and tensor headers only: for a Hub id, ``config.json`` plus HTTP range reads of the
    safetensors headers (no weights are downloaded); for a folder, the header bytes of each shard."""
    ref = parse_model_ref(model, revision)
    if ref.folder is None and not _offline():
        return _hub_metadata(ref, token)
    folder = ref.folder if ref.folder is not None else _download(ref, token)
    _require_safetensors(folder, ref)
    from .checkpoint import ShardedReader  # local import: reader pulls in torch

    reader = ShardedReader(folder)
    return ModelMetadata(ref, read_config(folder), reader.metas, reader.files)


# --------------------------------------------------------------------------------------------- the Hub


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when it cannot connect: OS errors, and the transport errors of its HTTP
    library (httpx2 in huggingface_hub 2, httpx in 1), which are not OS errors."""
    found: list[type[BaseException]] = [OSError, ConnectionError]
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(importlib.import_module(name).TransportError)
    return tuple(found)


UNREACHABLE_ERRORS = _unreachable_errors()


def hub_accepts_connections(endpoint: str) -> bool:
    """Whether ``endpoint``'s host accepts a TCP connection, in one try (asked anew each time: a
    long-lived process may see the network come back). Behind a proxy (which the client goes through,
    and which may resolve names this machine cannot) the answer is left to the client: True."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS).close()
    except (OSError, ValueError):  # no such host, refused, timed out; ValueError: a malformed endpoint
        return False
    return True


def _offline() -> bool:
    """Whether the Hub is used through the local cache alone: ``HF_HUB_OFFLINE``, or a Hub that cannot
    be reached."""
    return hub_constants.HF_HUB_OFFLINE or not hub_accepts_connections(hub_constants.ENDPOINT)


@functools.cache
def _note_cached(ref_text: str) -> None:
    """Said once, in a line, where the cache stood in for an unreachable Hub: the snapshot found there
    may not be the newest."""
    logger.warning("note: the Hub cannot be reached; %s is read from the local cache", ref_text)


@contextlib.contextmanager
def _hub_errors(ref: ModelRef) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line messages that say what to do."""
    try:
        yield
    except hub_errors.GatedRepoError:
        raise ModelNotFoundError(
            f"{ref.repo_id} is gated: accept its terms on the Hub, then log in or set HF_TOKEN"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{ref.repo_id}: no such model on the Hub (check the name; private repos need HF_TOKEN or a login)"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise ModelNotFoundError(f"{ref.repo_id} has no revision {ref.revision!r}") from None
    except hub_errors.LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"{ref}: not in the local Hugging Face cache, and the Hub cannot be reached (offline?)"
        ) from None
    except hub_errors.OfflineModeIsEnabled:
        raise ModelNotFoundError(f"{ref}: HF_HUB_OFFLINE is set and the files are not cached") from None
    except hub_errors.HfHubHTTPError as err:
        raise ModelNotFoundError(f"{ref}: the Hub answered {first_line(err)}") from None
    except UNREACHABLE_ERRORS as err:
        raise ModelNotFoundError(
            f"{ref}: cannot reach the Hub ({first_line(err)}); with the files cached, HF_HUB_OFFLINE=1 uses them"
        ) from None


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _download(ref: ModelRef, token: str | None) -> Path:
    """Fetch config, tokenizer, index and only the shards the index names (or model.safetensors)."""
    assert ref.repo_id is not None
    offline = _offline()
    with _hub_errors(ref):
        folder = Path(
            huggingface_hub.snapshot_download(
                ref.repo_id,
                revision=ref.revision,
                token=token,
                allow_patterns=[*SIDE_FILE_PATTERNS, INDEX_NAME, CARD_NAME],
                local_files_only=offline,
            )
        )
        if (folder / INDEX_NAME).exists():
            weights = index_files(folder / INDEX_NAME)
        elif _repo_has(ref, token, SINGLE_NAME, offline):
            weights = [SINGLE_NAME]
        else:
            _raise_no_safetensors(ref, token, offline)
        folder = Path(
            huggingface_hub.snapshot_download(
                ref.repo_id,
                revision=ref.revision,
                token=token,
                allow_patterns=[*SIDE_FILE_PATTERNS, INDEX_NAME, CARD_NAME, *weights],
                local_files_only=offline,
            )
        )
    if offline and not hub_constants.HF_HUB_OFFLINE:
        _note_cached(str(ref))
    _require_safetensors(folder, ref)
    return folder


def _repo_has(ref: ModelRef, token: str | None, filename: str, offline: bool) -> bool:
    if offline:
        try:
            huggingface_hub.hf_hub_download(
                ref.repo_id, filename, revision=ref.revision, token=token, local_files_only=True
            )
            return True
        except hub_errors.LocalEntryNotFoundError:
            return False
    return huggingface_hub.file_exists(ref.repo_id, filename, revision=ref.revision, token=token)


def _raise_no_safetensors(ref: ModelRef, token: str | None, offline: bool = False) -> None:
    files: list[str] = []
    if not offline:
        files = huggingface_hub.list_repo_files(ref.repo_id, revision=ref.revision, token=token)
    if any(f.endswith(PICKLE_SUFFIXES) for f in files):
        raise UnsupportedModelError(
            f"{ref} has only pickle weights (.bin/.pt), which are never loaded for safety; "
            "use a safetensors revision of the model"
        )
    raise UnsupportedModelError(f"{ref} has no safetensors weights ({INDEX_NAME} or {SINGLE_NAME})")


def _hub_metadata(ref: ModelRef, token: str | None) -> ModelMetadata:
    assert ref.repo_id is not None
    with _hub_errors(ref):
        config_path = huggingface_hub.hf_hub_download(
            ref.repo_id, "config.json", revision=ref.revision, token=token
        )
        try:
            repo_meta = huggingface_hub.get_safetensors_metadata(
                ref.repo_id, revision=ref.revision, token=token
            )
        except hub_errors.NotASafetensorsRepoError:
            _raise_no_safetensors(ref, token)
        except hub_errors.SafetensorsParsingError as err:
            raise CorruptCheckpointError(f"{ref}: {first_line(err)}") from None
    config = read_config(Path(config_path).parent)
    tensors: dict[str, TensorMeta] = {}
    for file, file_meta in sorted(repo_meta.files_metadata.items()):
        for name, info in file_meta.tensors.items():
            if info.dtype not in DTYPE_SIZES:
                raise CorruptCheckpointError(f"{file}: tensor {name!r} has unsupported dtype {info.dtype!r}")
            if name in tensors:
                raise CorruptCheckpointError(
                    f"tensor {name!r} appears in both {tensors[name].file} and {file}"
                )
            tensors[name] = TensorMeta(name, info.dtype, tuple(info.shape), file)
    return ModelMetadata(ref, config, tensors, sorted(repo_meta.files_metadata))


def _require_safetensors(folder: Path, ref: ModelRef) -> None:
    if (folder / INDEX_NAME).exists() or (folder / SINGLE_NAME).exists():
        return
    if any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
        raise UnsupportedModelError(
            f"{ref} has only pickle weights (.bin/.pt), which are never loaded for safety; "
            "convert them to safetensors first"
        )
    raise UnsupportedModelError(f"{ref} has no safetensors weights ({INDEX_NAME} or {SINGLE_NAME})")


__all__ = ["ModelMetadata", "ModelRef", "parse_model_ref", "read_header", "read_metadata", "resolve_model"]
