"""``--format fused``: quantized experts stacked per projection, in transformers 5's runtime names.

Per MoE layer the experts of a projection stay one entry, as in ``fuse`` output, in compressed-tensors'
packing with a leading expert dimension (``P = model.layers.{i}.mlp.experts.gate_up_proj`` or
``...down_proj``):

| tensor | dtype | shape |
|---|---|---|
| ``P.weight_packed`` | int32 | [E, out, in*bits/32] |
| ``P.weight_scale`` | source dtype | [E, out, groups] |
| ``P.weight_zero_point`` | int32 | [E, ceil(out*bits/32), groups] (asymmetric only) |
| ``P.weight_shape`` | int64 | [E, 2] |

Dense Linears (attention, dense and shared MLPs) use the same names without the expert dimension. This
is the layout a stacked-expert kernel consumes directly; :func:`load_fused` dequantizes it into a
transformers model (no serving engine reads it as is).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..families import is_stack_name
from ..quant.packing import unpack_compressed
from ..quant.scheme import Scheme
from .compressed_tensors import CompressedTensorsFormat, _weights_args

FORMAT_NAME = "moeconvert-fused-pack-quantized"


class FusedFormat(CompressedTensorsFormat):
    name = "fused"
    layout = "fused"

    def config(
        self, schemes: dict[str, Scheme], ignored: list[str], carried_layers: Sequence[int] = ()
    ) -> dict[str, Any]:
        return {  # names every quantized module: nothing else is
            "quant_method": "moeconvert",
            "format": FORMAT_NAME,
            "modules": {name: _weights_args(scheme) for name, scheme in sorted(schemes.items())},
        }


def dequantize_fused(
    tensors: dict[str, torch.Tensor], modules: dict[str, dict[str, Any]]
) -> dict[str, torch.Tensor]:
    """Replace every packed module of ``tensors`` (runtime names) by its dequantized ``weight``."""
    out = dict(tensors)
    for module, args in modules.items():
        parts = {key: out.pop(f"{module}.{key}") for key in list(_KEYS) if f"{module}.{key}" in out}
        if not parts:
            continue
        qw = unpack_compressed(parts, args["num_bits"], args["symmetric"], group_size=args["group_size"])
        dtype = parts["weight_scale"].dtype
        name = module if is_stack_name(module) else module + ".weight"
        out[name] = qw.dequantize().to(dtype)
    return out


_KEYS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def load_fused(folder: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A transformers model with the dequantized weights of a ``--format fused`` checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from ..checkpoint import ShardedReader

    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    quant = raw.pop("quantization_config", {})
    if quant.get("format") != FORMAT_NAME:
        raise ValueError(f"{folder} is not a {FORMAT_NAME} checkpoint")
    config = AutoConfig.for_model(**raw)
    auto = AutoModelForImageTextToText if "vision_config" in raw else AutoModelForCausalLM  # Qwen3.5: whole
    model = auto.from_config(config)  # real buffers (rotary tables); weights replaced below
    state: dict[str, torch.Tensor] = {}
    with ShardedReader(folder) as reader:
        for _, names in reader.layer_names().items():
            state.update(dequantize_fused(reader.get_many(names), quant["modules"]))
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
