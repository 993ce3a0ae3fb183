"""Per-expert weights <-> stacked expert tensors: pure, lossless tensor functions.

The stacked layout is transformers 5's runtime layout: ``gate_up`` is [E, 2I, H] with each expert's
gate rows first, then its up rows (``up`` [E, I, H] where experts have no gate); ``down`` is [E, H, I].
Stacking and slicing copy bytes and never change values, so a round trip is bit-exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def stack_experts(*projections: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert weights of each projection, the down projection last: E gate [I,H], E up [I,H] and E
    down [H,I] -> (gate_up [E,2I,H], down [E,H,I]); without a gate, E up and E down -> (up [E,I,H], down)."""
    *inputs, down = projections
    if not inputs or len({len(p) for p in projections}) != 1 or not down:
        raise ValueError("every expert needs each of its projections")
    stacked = [torch.stack(list(p)) for p in inputs]
    return (torch.cat(stacked, dim=1) if len(stacked) > 1 else stacked[0]), torch.stack(list(down))


def unstack_experts(
    inputs: torch.Tensor, down: torch.Tensor, parts: int = 2
) -> tuple[list[torch.Tensor], ...]:
    """Inverse of :func:`stack_experts`: per-expert lists of each of the ``parts`` input projections (gate
    and up, or up alone), then of down, as contiguous copies."""
    if inputs.dim() != 3 or down.dim() != 3 or inputs.shape[0] != down.shape[0]:
        raise ValueError(f"expected stacks [E,{parts}I,H] and [E,H,I], got {inputs.shape} and {down.shape}")
    size = inputs.shape[1] // parts
    if inputs.shape[1] != parts * size or down.shape[2] != size or down.shape[1] != inputs.shape[2]:
        raise ValueError(f"expert stacks {list(inputs.shape)} and {list(down.shape)} do not fit together")
    split = [
        [inputs[e, p * size : (p + 1) * size].contiguous() for e in range(inputs.shape[0])]
        for p in range(parts)
    ]
    return (*split, [down[e].contiguous() for e in range(down.shape[0])])
