"""A quantization scheme is data: one small frozen object passed down, never a web of flags.

The integer grid is shared by every method and output format: unsigned codes ``q`` in
``[0, 2**bits - 1]``, a per-group ``scale`` and integer ``zero``, and ``w ~= scale * (q - zero)``.
Symmetric schemes fix ``zero = 2**(bits-1)`` and ``scale = 2 * max|w| / (2**bits - 1)``, which is both
the GPTQ reference grid and compressed-tensors' symmetric int grid (signed codes ``q - zero``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scheme:
    bits: int = 4  # 4 or 8
    group_size: int = 128  # input channels sharing a scale; -1 = one group per output channel
    sym: bool = True
    method: str = "gptq"  # "gptq" or "rtn"
    act_order: bool = True  # GPTQ: quantize columns by decreasing Hessian diagonal
    # GPTQ: every group's scale from the weights before the solve, so that act-order keeps groups of
    # consecutive columns (no group index: plain layout, every kernel); False: as the solve reaches it
    static_groups: bool = True
    damp: float = 0.01  # GPTQ: fraction of the mean Hessian diagonal added to it
    block_size: int = 128  # GPTQ: columns per lazy-batch block

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(f"group size must be -1 or a positive multiple of 8, got {self.group_size}")
        if self.method not in ("gptq", "rtn"):
            raise ValueError(f"method must be gptq or rtn, got {self.method!r}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")

    @property
    def group_index(self) -> bool:
        """Whether outputs carry a per-column group index (``g_idx``): GPTQ act-order without static
        groups, whose groups are scattered over the columns."""
        return self.method == "gptq" and self.act_order and not self.static_groups

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        """Number of scale groups along the input dimension."""
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    @property
    def label(self) -> str:
        """Short name for folders and cards, e.g. ``w4g128-gptq`` or ``w8ch-rtn-asym``."""
        group = "ch" if self.group_size == -1 else f"g{self.group_size}"
        return f"w{self.bits}{group}-{self.method}" + ("" if self.sym else "-asym")
