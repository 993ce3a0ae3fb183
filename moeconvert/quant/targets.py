"""Which weights are quantized, and with which scheme.

A :class:`TargetPolicy` is an ordered list of rules ``(pattern, scheme or None)`` over module names;
the first rule whose regular expression is found in a name decides (None keeps full precision); names no
rule matches get the base scheme. Routers, gates and ``lm_head``/embeddings are never candidates unless a
rule names them: they are small, and quantizing a router re-routes tokens, which wrecks accuracy.
Expert stacks are matched by the name of their first expert's module in the checkpoint's own naming
(``model.layers.3.block_sparse_moe.experts.0.w1``) and by their fused name
(``model.layers.3.mlp.experts.gate_up_proj``), so recipes may use either.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .scheme import Scheme

# Modules kept in full precision by default, whatever the base scheme.
ALWAYS_KEEP = (
    r"\.(?:mlp|feed_forward)\.gate$",  # LFM2-MoE's block is feed_forward
    r"\.(?:mlp|feed_forward)\.router$",  # Jamba's block is feed_forward
    r"\.mlp\.router\.gate$",  # Arcee's Trinity: the router's Linear inside its router module
    r"\.mlp\.gate\.wg$",  # Hunyuan's: inside its gate module
    r"\.router\.proj$",  # Gemma 4's: the router's Linear, in the decoder layer itself
    r"shared_expert_gate$",
    r"(^|\.)lm_head$",
    r"embed_tokens$",
)


@dataclass(frozen=True)
class Rule:
    pattern: str
    scheme: Scheme | None  # None: keep in full precision

    def matches(self, names: Sequence[str]) -> bool:
        return any(re.search(self.pattern, n) for n in names)


@dataclass(frozen=True)
class TargetPolicy:
    base: Scheme = field(default_factory=Scheme)
    rules: tuple[Rule, ...] = ()
    keep: tuple[str, ...] = ()  # the family's own defaults kept in full precision (``Family.keep``)

    def scheme_for(self, *names: str) -> Scheme | None:
        """The scheme for a module known by ``names`` (aliases of one module), or None to keep it."""
        for rule in self.rules:
            if rule.matches(names):
                return rule.scheme
        if any(re.search(p, n) for p in (*ALWAYS_KEEP, *self.keep) for n in names):
            return None
        return self.base

    def unused_rules(self, seen: Sequence[Sequence[str]]) -> list[str]:
        """Patterns that matched none of the module names seen (a recipe typo, most likely)."""
        return [r.pattern for r in self.rules if not any(r.matches(names) for names in seen)]
