"""What an MoE architecture family looks like on disk: an explicit name table plus config keys.

Each family module fills in one :class:`Family`. Names are given relative to a decoder layer
(``model.layers.{i}.``). The *original* layout stores one Linear per expert and projection; the
*fused* layout is the transformers 5 runtime layout, which stacks them into two tensors per layer,
``{block}.experts.gate_up_proj`` [E, 2I, H] (rows 0..I-1 gate, I..2I-1 up) and
``{block}.experts.down_proj`` [E, H, I], where ``block`` is the MoE block's runtime name (``mlp`` in
most families); experts without a gate projection (Nemotron-H's) stack theirs as
``{block}.experts.up_proj`` [E, I, H].
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

STACKS = ("experts.gate_up_proj", "experts.down_proj")  # within the MoE block, in the runtime layout
# ... of experts without a gate projection (Nemotron-H's): up [E, I, H], down [E, H, I]
UNGATED_STACKS = ("experts.up_proj", "experts.down_proj")


def is_stack_name(name: str) -> bool:
    """Whether ``name`` (in its layer or in the model) is a stack of experts in the runtime layout: no
    per-expert name, and no shared expert's, ends like one."""
    return any(name == stack or name.endswith("." + stack) for stack in {*STACKS, *UNGATED_STACKS})


def in_block(block: str, name: str) -> str:
    """``name`` inside the in-layer module ``block``: ``mlp.experts``, or ``experts`` where the experts
    hang off the decoder layer itself (``block`` empty, Gemma 4's)."""
    return f"{block}.{name}" if block else name


def block_of(stack: str) -> str:
    """The in-layer module that holds the expert stack named ``stack`` (``mlp`` of
    ``mlp.experts.gate_up_proj``; empty where the layer holds the experts itself): :func:`in_block`'s
    inverse."""
    return stack.rpartition("experts.")[0].removesuffix(".")


@dataclass(frozen=True)
class Family:
    """Names and config keys of one MoE architecture family.

    ``renames`` maps original in-layer name prefixes to fused ones for tensors that transformers 5
    renames without reshaping (mixtral's ``block_sparse_moe.gate.`` becomes ``mlp.gate.``).
    """

    model_types: tuple[str, ...]
    moe_block: str  # original in-layer prefix of the MoE block, e.g. "block_sparse_moe"
    # original names of an expert's (gate, up, down) Linear layers, or (up, down) where experts have no
    # gate (Nemotron-H's: ``down(act(up(x)))``)
    projections: tuple[str, ...]
    num_experts_key: str
    top_k_key: str
    expert_size_key: str
    renames: tuple[tuple[str, str], ...] = ()
    router: str = "mlp.gate"  # fused in-layer name of the router module
    shared_experts: str | None = None  # fused in-layer name of the shared expert(s) module, if any
    shared_count_key: str | None = None  # config key of how many experts that module holds (else one)
    # Patterns of modules kept in full precision unless a rule names them: those that quantization
    # damages far beyond their size, as the field's recipes for the family keep them.
    keep: tuple[str, ...] = ()
    # Whether the family's releases store experts stacked but transposed, gate_up [E, H, 2I] and down
    # [E, I, H] (Qwen3-VL-MoE): transformers reads either orientation, vLLM only this one.
    transposed_stacks: bool = False
    # Whether the family's releases store experts stacked in the runtime orientation under names of their
    # own, which ``renames`` map to the runtime stacks (Granite's ``block_sparse_moe.input_linear.weight``)
    released_stacks: bool = False
    # Whether the family's releases store experts in transformers' runtime layout itself (Granite SWA's):
    # the original layout is then one vLLM reads, per expert, but transformers does not
    runtime_releases: bool = False
    block: str = "mlp"  # in-layer runtime name of the MoE block (transformers' module)
    # In-layer runtime names of Linears that read the routed experts' output (Nemotron 3 Super's
    # ``mixer.fc2_latent_proj``): a statistics pass runs the experts when one of them is calibrated
    reads_routed_output: tuple[str, ...] = ()
    # Whether the router's scores multiply the experts' input rather than their output (Llama 4's: each
    # expert computes ``down(act(gate(s x)) * up(s x))`` for its score ``s``), so an expert's calibration
    # rows are its tokens scaled by their scores, as it sees them
    scales_expert_inputs: bool = False

    @property
    def runtime_transposed(self) -> bool:
        """Whether transformers' module holds the experts stacked transposed, [E, H, 2I] and [E, I, H]
        (Llama 4's, stored so by its releases): every command works on [E, 2I, H] stacks, and the
        streamed forward hands the module their transpose (a view)."""
        return self.transposed_stacks and self.runtime_releases

    @property
    def transformers_reads_per_expert(self) -> bool:
        """Whether transformers loads this family's experts stored one per expert, as quantized outputs
        store them (vLLM's names): not where its releases stack them, which is all it reads."""
        return not (self.transposed_stacks or self.released_stacks or self.runtime_releases)

    @property
    def gated(self) -> bool:
        """Whether experts compute ``down(act(gate(x)) * up(x))`` (most families) or ``down(act(up(x)))``."""
        return len(self.projections) == 3

    @property
    def input_projections(self) -> range:
        """Indices in :attr:`projections` of those that read the expert's input (gate and up, or up)."""
        return range(len(self.projections) - 1)

    @property
    def down_projection(self) -> int:
        """Index in :attr:`projections` of the down projection."""
        return len(self.projections) - 1

    @property
    def fused_gate_up(self) -> str:
        """In-layer runtime name of the stacked input projections: gate/up [E, 2I, H], or up [E, I, H]."""
        return in_block(self.block, (STACKS if self.gated else UNGATED_STACKS)[0])

    @property
    def fused_down(self) -> str:
        """In-layer runtime name of the stacked down projections, [E, H, I]."""
        return in_block(self.block, STACKS[1])

    @property
    def fused_stacks(self) -> tuple[str, str]:
        return self.fused_gate_up, self.fused_down

    @property
    def name(self) -> str:
        return self.model_types[0]

    def num_experts(self, config: Any) -> int:
        return int(getattr(config, self.num_experts_key))

    def top_k(self, config: Any) -> int:
        return int(getattr(config, self.top_k_key))

    def expert_size(self, config: Any) -> int:
        return int(getattr(config, self.expert_size_key))

    def expert_input_size(self, config: Any) -> int:
        """The width experts read and write: the hidden size, or where a family projects the hidden
        states down before its experts (Nemotron 3 Super's latent MoE) that width."""
        return int(config.hidden_size)

    def num_shared_experts(self, config: Any) -> int:
        """Shared experts per MoE layer (DeepSeek: n_shared_experts; Qwen2-MoE: one, with a gate)."""
        if self.shared_experts is None:
            return 0
        return 1 if self.shared_count_key is None else int(getattr(config, self.shared_count_key) or 0)

    def is_moe_layer(self, config: Any, layer: int) -> bool:
        return True

    def routing_problem(self, config: Any) -> str | None:
        """What in ``config`` no router can do (None when it routes): checked before any work, since
        the router would fail only in the forward pass."""
        experts, top_k = self.num_experts(config), self.top_k(config)
        if experts == 0:  # Granite 4.0-H-Micro's kind: the family's layers without their experts
            return f"{self.num_experts_key}=0 makes it a dense model, with no experts to convert"
        if not 1 <= top_k <= experts:
            return f"{self.top_k_key}={top_k} with {self.num_experts_key}={experts} (routing needs 1 <= top-k <= experts)"
        return None

    def original_expert_re(self) -> re.Pattern[str]:
        """Matches an original per-expert weight name in a layer; groups: expert index, projection."""
        names = "|".join(re.escape(p) for p in self.projections)
        experts = re.escape(in_block(self.moe_block, "experts"))
        return re.compile(rf"^{experts}\.(\d+)\.({names})\.weight$")

    def to_fused_name(self, in_layer: str) -> str:
        for original, fused in self.renames:
            if in_layer.startswith(original):
                return fused + in_layer[len(original) :]
        return in_layer

    def to_original_name(self, in_layer: str) -> str:
        for original, fused in self.renames:  # a name already original stays (Granite's fused router
            if in_layer.startswith(fused) and not in_layer.startswith(original):  # name prefixes its own)
                return original + in_layer[len(fused) :]
        return in_layer

    def original_expert_name(self, expert: int, projection: int) -> str:
        return in_block(self.moe_block, f"experts.{expert}.{self.projections[projection]}.weight")


# The names and keys most families share (Qwen-MoE's): experts under ``mlp.experts.{e}.gate_proj/up_proj/
# down_proj``, ``num_experts`` of them, the top ``num_experts_per_tok`` routed to, ``moe_intermediate_size``
# wide
QWEN_STYLE: dict[str, Any] = dict(
    moe_block="mlp",
    projections=("gate_proj", "up_proj", "down_proj"),
    num_experts_key="num_experts",
    top_k_key="num_experts_per_tok",
    expert_size_key="moe_intermediate_size",
)
