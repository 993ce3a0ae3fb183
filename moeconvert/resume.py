"""What a partial quantize output records so that the same command, run again, continues where it stopped.

Quantizing a large MoE takes hours; a crash, ``kill -9`` or Ctrl-C at layer 40 must not cost layers 0-39.
Inside the staging folder (``.<name>.partial``), besides the finished layers in ``.parts/``:

- ``.resume/settings.json``: everything that decides the output bytes (source, scheme, rules, options,
  device type, library versions). A rerun with other settings is refused rather than mixed in.
- ``.resume/hidden.safetensors``: the calibration hidden states at the boundary of the last finished
  layer, exactly as the next layer would have received them, so the rest of the run is bit-identical to
  an uninterrupted one.
- ``.resume/progress.json``: how many groups are finished, their reports and schemes.

Per finished group the part, then the hidden states, then the progress are each written to a temporary
file, flushed to disk and renamed, so ``progress.json`` never names work that is not complete on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .distributed import Ranks, barrier
from .errors import BadInputError
from .forward import carried, with_carried

RESUME_DIR = ".resume"


@dataclass
class Progress:
    """The state after ``groups_done`` groups (embeddings first, then layers in order)."""

    groups_done: int = 0
    layers: list[dict[str, Any]] = field(default_factory=list)  # LayerReport dicts
    schemes: dict[str, dict[str, Any]] = field(default_factory=dict)  # module -> Scheme fields
    tokens_sha256: str | None = None
    batch_count: int = 0  # calibration batches over all ranks


class RunState:
    """The resume records of one staging folder."""

    def __init__(self, staging: Path, settings: dict[str, Any], ranks: Ranks | None = None) -> None:
        self.folder = Path(staging) / RESUME_DIR
        self.ranks = ranks or Ranks()
        if self.ranks.distributed:  # each rank keeps its own batches' hidden states
            settings = {**settings, "world_size": self.ranks.world}
        self.settings = json.loads(json.dumps(settings, sort_keys=True))  # as it reads back from disk
        suffix = f".rank{self.ranks.rank}" if self.ranks.distributed else ""
        self.hidden_path = self.folder / f"hidden{suffix}.safetensors"

    def check(self, final: Path, force: bool) -> None:
        """Before anything touches a partial output: resume one left by a run with these settings (with
        ``force`` too, which replaces finished outputs, not work that gives the same bytes); refuse one
        with other settings, or with ``force`` delete it to start over."""
        stored = self._read_json("settings.json")
        if stored is None or stored == self.settings:
            return
        if force:
            shutil.rmtree(self.folder.parent)
            return
        changed = sorted(
            k for k in stored.keys() | self.settings.keys() if stored.get(k) != self.settings.get(k)
        )
        raise BadInputError(
            f"{final} has an unfinished run with other settings ({', '.join(changed)} differ): rerun it with "
            "the same settings to resume, or add --force to start over"
        )

    def start(self) -> Progress:
        """The progress to continue from (nothing done for a fresh staging folder)."""
        if self.ranks.writes:
            self.folder.mkdir(parents=True, exist_ok=True)
            if self._read_json("settings.json") is None:
                write_atomic(self.folder / "settings.json", _dump(self.settings))
        barrier()
        data = self._read_json("progress.json")
        return Progress(**data) if data else Progress()

    def record(self, progress: Progress, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Make ``progress`` (its part already on disk) and the hidden states after it durable; returns
        the hidden states to go on with.

        On a CPU those are the record itself, mapped: the same bytes, held as clean file pages, which
        the OS may drop under memory pressure and read back when a pass needs them, instead of
        anonymous memory it must keep. The calibration activations are the one term of quantize's
        memory that is not bounded by a layer (4.3 GB for Mixtral-8x7B at 128 x 2048 tokens in
        float32); where memory is short they are read from disk, batch by batch, rather than
        crowding out the layer. On a GPU they stay where they are."""
        if hidden:
            path = self.hidden_path
            tensors = {f"batch.{i:06d}": h.detach().to("cpu").contiguous() for i, h in enumerate(hidden)}
            for i, h in enumerate(hidden):  # what the last layer hands the next one (GLM-5's picks)
                if (state := carried(h)) is not None:
                    tensors[f"carried.{i:06d}"] = state.to("cpu").contiguous()
            staged = path.with_name(f".{path.name}.tmp")
            save_file(tensors, staged)
            _fsync(staged)
            os.replace(staged, path)
            del tensors
        barrier()  # every rank's hidden states are on disk before the progress names them
        if self.ranks.writes:
            write_atomic(self.folder / "progress.json", _dump(progress.__dict__))
        if hidden and hidden[0].device.type == "cpu":
            return self._read_hidden(hidden[0].device)
        return hidden

    def discard(self) -> None:
        """Drop the records once the output is complete (they must not end up in the final folder)."""
        shutil.rmtree(self.folder)

    def hidden(self, device: torch.device) -> list[torch.Tensor]:
        """The recorded hidden states, batch by batch (none without a record), to resume a run or to
        bring them back after a layer's solves; on a CPU, views of the file's private mapping."""
        return self._read_hidden(device) if self.hidden_path.exists() else []

    def _read_hidden(self, device: torch.device) -> list[torch.Tensor]:
        tensors = load_file(self.hidden_path)
        batches = sorted(name for name in tensors if name.startswith("batch."))
        return [
            with_carried(
                tensors[name].to(device), _on(tensors.get(name.replace("batch.", "carried.")), device)
            )
            for name in batches
        ]

    def _read_json(self, name: str) -> dict[str, Any] | None:
        path = self.folder / name
        return json.loads(path.read_text()) if path.exists() else None


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _dump(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _fsync(path: Path) -> None:
    with path.open("rb") as file:
        os.fsync(file.fileno())


def write_atomic(path: Path, text: str) -> None:
    staged = path.with_name(f".{path.name}.tmp")
    with staged.open("w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(staged, path)


def pause_for_tests(point: str, what: str) -> None:
    """Test hook: with ``MOECONVERT_TEST_PAUSE_AFTER=POINT`` (a group's index, or ``shardN`` during
    assembly), say so on stderr and wait once that point is recorded, so a test can kill or interrupt a
    real run there."""
    if os.environ.get("MOECONVERT_TEST_PAUSE_AFTER") == point:
        print(f"\npaused after {what}", file=sys.stderr, flush=True)
        time.sleep(120)
