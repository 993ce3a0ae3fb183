"""Per-expert weights <-> stacked expert tensors: pure, lossless tensor functions.

The stacked layout is transformers 5's runtime layout: ``gate_up`` is [E, 2I, H] with each expert's
gate rows first, then its up rows; ``down`` is [E, H, I]. Stacking and slicing copy bytes and never
change values, so a round trip is bit-exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def stack_experts(
    gate: Sequence[torch.Tensor], up: Sequence[torch.Tensor], down: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """E gate [I,H], E up [I,H] and E down [H,I] weights -> (gate_up [E,2I,H], down [E,H,I])."""
    if not (len(gate) == len(up) == len(down)) or not gate:
        raise ValueError("every expert needs a gate, an up and a down projection")
    gate_up = torch.cat([torch.stack(list(gate)), torch.stack(list(up))], dim=1)
    return gate_up, torch.stack(list(down))


def unstack_experts(
    gate_up: torch.Tensor, down: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Inverse of :func:`stack_experts`: per-expert (gate, up, down) lists, as contiguous copies."""
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0]:
        raise ValueError(f"expected gate_up [E,2I,H] and down [E,H,I], got {gate_up.shape} and {down.shape}")
    size = gate_up.shape[1] // 2
    if gate_up.shape[1] != 2 * size or down.shape[2] != size or down.shape[1] != gate_up.shape[2]:
        raise ValueError(f"gate_up {list(gate_up.shape)} and down {list(down.shape)} do not fit together")
    gate = [gate_up[e, :size].contiguous() for e in range(gate_up.shape[0])]
    up = [gate_up[e, size:].contiguous() for e in range(gate_up.shape[0])]
    return gate, up, [down[e].contiguous() for e in range(down.shape[0])]
