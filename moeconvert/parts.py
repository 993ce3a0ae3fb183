"""Per-layer part files: a quantize run's finished layers on disk, later assembled into capped shards.

A quantized layer's output shapes are known only once it is computed, so each finished layer is written
at once as its own part (``<staging>/.parts/NNNNNN.safetensors``), which is what a resumed run keeps.
Assembly then streams the parts into the final shards and deletes each part as soon as the shard that
holds it is on disk: the disk never holds the output twice over (at DeepSeek-V3's size, 360 GB at 4 bits,
not 720 GB at the very end of a long run), only the output plus the shards in flight.

Assembly is resumable too: its plan (every part's tensors, read before any part is deleted) and the
shards finished so far are recorded in ``.parts/assembly.json``; a run stopped during it writes only the
shards that were not finished, and the result is byte for byte an uninterrupted one's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .checkpoint import TORCH_DTYPES, PlannedTensor, ShardedWriter
from .progress import progress_bar
from .resume import pause_for_tests, write_atomic
from .safetensors_header import read_header

PARTS_DIR = ".parts"
ASSEMBLY_RECORD = "assembly.json"


class PartsWriter:
    """Writes each layer as its own part file as soon as it is done, then assembles capped shards."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.parts = self.folder / PARTS_DIR
        self.parts.mkdir(exist_ok=True)
        self.record = self.parts / ASSEMBLY_RECORD

    def part_path(self, index: int) -> Path:
        return self.parts / f"{index:06d}.safetensors"

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self.part_path(index)
        tmp = path.with_suffix(".tmp")
        save_file(_unaliased(tensors), tmp, metadata={"format": "pt"})
        os.replace(tmp, path)

    def assemble(self, max_shard_size: int, show_progress: bool = False) -> dict[str, str]:
        """Turn the parts into ``model*.safetensors`` (+ index), deleting each part once its shard is
        durable; returns each shard's sha256. Goes on from a recorded assembly that was stopped. At
        DeepSeek-V3's size this is minutes of writing, shown in bytes."""
        plan = self._plan(max_shard_size)
        files, done = plan["parts"], plan["done"]
        groups = [[PlannedTensor(n, TORCH_DTYPES[d], tuple(s)) for n, d, s in g] for g in plan["groups"]]
        writer = ShardedWriter(self.folder, groups, plan["max_shard_size"], done=done)
        self._retire(writer, [(shard, "") for shard, name in enumerate(writer.names) if name in done], plan)
        todo = [index for index in range(len(files)) if writer.writes(index)]
        total = sum(t.nbytes for index in todo for t in groups[index])
        bar = progress_bar(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="write shards",
                           dynamic_ncols=True, show=show_progress)  # fmt: skip
        try:
            for index in todo:
                with safe_open(str(self.parts / files[index]), framework="pt") as handle:
                    tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
                bar.update(writer.write_group(index, tensors))
                del tensors
                self._retire(writer, writer.finished_shards(), plan)
        finally:
            bar.close()
            writer.abort()
        writer.finish()
        self._retire(writer, writer.finished_shards(), plan)
        shutil.rmtree(self.parts)
        return writer.digests

    def _plan(self, max_shard_size: int) -> dict[str, Any]:
        """The recorded assembly, or a new one read from the parts' headers (recorded before any part
        is deleted: a resumed assembly needs the shapes of parts that are gone)."""
        if self.record.exists():
            return json.loads(self.record.read_text())
        files = sorted(path.name for path in self.parts.glob("*.safetensors"))
        groups = []
        for name in files:
            metas = read_header(self.parts / name)
            groups.append([[n, m.dtype, list(m.shape)] for n, m in sorted(metas.items())])
        plan = {"max_shard_size": max_shard_size, "parts": files, "groups": groups, "done": {}}
        write_atomic(self.record, json.dumps(plan) + "\n")
        return plan

    def _retire(self, writer: ShardedWriter, finished: list[tuple[int, str]], plan: dict[str, Any]) -> None:
        """Record finished shards (durably, first), then delete the parts they hold."""
        fresh = {writer.names[shard]: digest for shard, digest in finished if digest}
        if fresh:
            plan["done"].update(fresh)
            write_atomic(self.record, json.dumps(plan) + "\n")
        for shard, digest in finished:
            for index in writer.shards[shard]:
                (self.parts / plan["parts"][index]).unlink(missing_ok=True)
            if digest:
                pause_for_tests(f"shard{shard}", f"shard {shard}")


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
