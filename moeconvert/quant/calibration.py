"""Calibration data -> a fixed [samples, seq_len] tensor of token ids.

Sources: a local ``.txt`` file, a ``.jsonl`` file (field ``text``), a Hub dataset
``org/name[:config]:split:column`` (needs the optional ``datasets`` package), or the small corpus shipped
in the package (mixed prose, code, numbers and a few languages). Text is tokenized with the checkpoint's
own tokenizer; checkpoints without one (the tiny test models) use bytes as token ids. Windows are drawn
with a seeded generator, so the same source, settings and seed always give the same tokens.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import torch

from ..errors import BadInputError

DEFAULT_SOURCE = "default"


def load_text(source: str | None) -> str:
    """The calibration text of ``source`` (see module docstring)."""
    if source in (None, DEFAULT_SOURCE):
        return resources.files("moeconvert.data").joinpath("calibration.txt").read_text(encoding="utf-8")
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path)
    if hub_dataset_id(source):
        return _read_hub_dataset(source)
    raise BadInputError(
        f"calibration source {source!r}: no such file, and not org/name[:config]:split:column"
    )


def hub_dataset_id(source: str | None) -> str | None:
    """The Hub dataset id of an ``org/name[:config]:split:column`` source (model cards cite it), else None."""
    if source is None or source.count(":") < 2 or Path(source).expanduser().is_file():
        return None
    name = source.split(":")[0]
    return name if "/" in name else None


def _read_file(path: Path) -> str:
    if path.suffix != ".jsonl":
        return path.read_text(encoding="utf-8", errors="replace")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise BadInputError(f"{path}: not UTF-8 text (byte {err.start}); JSON lines must be UTF-8") from None
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            texts.append(str(json.loads(line)["text"]))
        except (ValueError, KeyError, TypeError):
            raise BadInputError(f"{path}:{number}: expected a JSON object with a 'text' field") from None
    return "\n\n".join(texts)


def _read_hub_dataset(source: str) -> str:
    parts = source.split(":")
    name, config = parts[0], (parts[1] if len(parts) == 4 else None)
    split, column = parts[-2], parts[-1]
    try:
        import datasets
    except ImportError:
        raise BadInputError(
            "Hub datasets as calibration need the 'datasets' package: pip install datasets"
        ) from None
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the datasets library raises many unrelated types
        raise BadInputError(f"cannot load calibration dataset {source}: {str(err).splitlines()[0]}") from None
    if column not in data.column_names:
        raise BadInputError(f"calibration dataset {name} has no column {column!r} (has {data.column_names})")
    return "\n\n".join(str(t) for t in data[column])


def tokenize(text: str, folder: Path | None, vocab_size: int) -> torch.Tensor:
    """1-D token ids of ``text`` with the checkpoint's tokenizer, or bytes when it has none."""
    has_tokenizer = folder is not None and any(
        (folder / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )
    if has_tokenizer:
        from transformers import AutoTokenizer

        try:  # built-in tokenizer classes only: code named by an auto_map is never imported
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except (ValueError, OSError) as err:
            reason = " ".join(str(err).split()) or type(err).__name__  # transformers' text spans lines
            raise BadInputError(f"{folder}: cannot load the checkpoint's tokenizer ({reason})") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)
    if vocab_size < 256:
        raise BadInputError("the checkpoint has no tokenizer and a vocabulary too small for byte tokens")
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def positions_note(seq_len: int, config: object) -> str | None:
    """A note when windows run past the positions the model was trained on (``max_position_embeddings``):
    its attention there is out of distribution, and so are statistics or parity measured there."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        return (
            f"note: --seq-len {seq_len} is longer than the model's {limit} positions "
            "(max_position_embeddings): its windows run past what the model was trained on"
        )
    return None


def sample_windows(stream: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens from a token stream (repeated if it is too short)."""
    if samples <= 0 or seq_len <= 0:
        raise BadInputError("--samples and --seq-len must be positive")
    if stream.numel() == 0:
        raise BadInputError("the calibration text is empty")
    if stream.numel() < seq_len + 1:
        stream = stream.repeat(-(-(seq_len + 1) // stream.numel()))
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (samples,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def calibration_tokens(
    source: str | None, folder: Path | None, vocab_size: int, samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """[samples, seq_len] token ids for calibrating (or verifying) a model."""
    return sample_windows(tokenize(load_text(source), folder, vocab_size), samples, seq_len, seed)


def tokens_digest(tokens: torch.Tensor) -> str:
    """sha256 of the token ids, recorded with outputs so a run's calibration data can be identified."""
    return hashlib.sha256(tokens.to(torch.int64).numpy().tobytes()).hexdigest()
