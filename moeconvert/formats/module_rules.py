"""The regular expressions a mixed-scheme ``quantization_config`` uses to pick out modules.

A rule written from one module's name goes wrong in two ways, and both break the checkpoint for its
loaders rather than for us:

* Generalized too far. ``model.layers.0.self_attn.q_proj`` may become a rule for every layer's q_proj
  only where every layer's q_proj has that scheme: a recipe may single out a layer, and two groups
  claiming one module leave the loader to pick the wrong bits.
* Spelled only as the checkpoint spells it. vLLM fuses Linear layers that checkpoints store apart (q/k/v
  into ``qkv_proj``, gate/up into ``gate_up_proj``, DeepSeek's q_a/kv_a into ``fused_qkv_a_proj``, a
  layer's experts into one ``experts`` module) and matches rules against those names: its GPTQ path
  against the ``experts`` module itself, its compressed-tensors path against ``experts.0.gate_proj``
  whatever the checkpoint calls the projection. It also renames a vision-language checkpoint's
  modules (Qwen3.5's ``model.language_model.`` is its ``language_model.model.``, ``model.visual.`` its
  ``visual.``): module names in a compressed-tensors ``ignore`` list are renamed with them, regexes
  are not. transformers and GPTQModel match the checkpoint's names, except that transformers' causal
  LM of such a checkpoint's text model alone (``AutoModelForCausalLM``) calls ``model.language_model.``
  ``model.``.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

from ..checkpoint import (
    BACKBONE,
    INNER_LM,
    TEXT_MODEL,
    TOWERS,
    is_mtp,
    is_tower,
    layer_index,
    layer_prefix,
    text_model_name,
)

Value = TypeVar("Value", bound=Hashable)

# checkpoint projection -> the vLLM module that holds it with others
FUSED_IN_VLLM = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
    "q_a_proj": "fused_qkv_a_proj",
    "kv_a_proj_with_mqa": "fused_qkv_a_proj",
    "in_proj_qkv": "in_proj_qkvz",  # Qwen3.5's linear attention (Qwen3-Next stores these two fused)
    "in_proj_z": "in_proj_qkvz",
    "in_proj_b": "in_proj_ba",
    "in_proj_a": "in_proj_ba",
}
# Mixtral's and Phi-MoE's expert projections -> the names vLLM's MoE layers look schemes up under
EXPERT_NAME_IN_VLLM = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
# a vision-language checkpoint's module prefixes -> the other names loaders give them: vLLM's (its
# hf_to_vllm_mapper for Qwen3.5), and transformers' for the text model loaded alone
PREFIX_ALIASES = {
    "model.language_model.": ("language_model.model.", "model."),
    "model.visual.": ("visual.",),
    "model.vision_tower.": ("vision_tower.",),  # Gemma 4's encoders and their projections
    "model.embed_vision.": ("embed_vision.",),
    "model.audio_tower.": ("audio_tower.",),
    "model.embed_audio.": ("embed_audio.",),
    "backbone.": ("model.",),  # Nemotron-H's text model, in vLLM and transformers
    "language_model.model.": ("model.",),  # Llama 4's: vLLM keeps it, transformers' text model alone not
}

_WILD = None  # a number made a wildcard in a name's key


def rules_by_value(assignment: Mapping[str, Value], experts_as_layer: bool) -> dict[Value, list[str]]:
    """For each value of ``assignment`` (module name -> scheme, or None for kept), regexes (``^...$``)
    that match its modules and no module assigned another value.

    A module's numbers (layer, expert) become wildcards where every module they would then cover has
    the same value; else the layer stays literal, else the whole name. ``experts_as_layer``: an expert's
    rule also matches its layer's ``experts`` module (vLLM's GPTQ path looks schemes up there).
    """
    split = {name: name.split(".") for name in assignment}
    levels = (0, 1, len(max(split.values(), key=len, default=[])))  # numbers kept literal, from the left
    seen: list[dict[tuple, set]] = [{} for _ in levels]
    for name, parts in split.items():
        for level, keep in enumerate(levels):
            seen[level].setdefault(_key(parts, keep), set()).add(assignment[name])
    rules: dict[Value, set[str]] = {}
    for name, parts in split.items():
        for level, keep in enumerate(levels):
            key = _key(parts, keep)
            if len(seen[level][key]) == 1:
                rules.setdefault(assignment[name], set()).add(_regex(key, experts_as_layer))
                break
    return {value: sorted(found) for value, found in rules.items()}


def vllm_expert_names(names: Iterable[str]) -> set[str]:
    """Mixtral's and Phi-MoE's expert projections among ``names`` under the names vLLM's MoE layers ask
    ``ignore`` about (``experts.0.w1`` -> ``experts.0.gate_proj``)."""
    found = set()
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        if leaf in EXPERT_NAME_IN_VLLM and prefix.rpartition(".")[0].endswith(".experts"):
            found.add(f"{prefix}.{EXPERT_NAME_IN_VLLM[leaf]}")
    return found


def vllm_split_modules(assignment: Mapping[str, Hashable]) -> list[str]:
    """The modules vLLM loads as one (``qkv_proj``, ``gate_up_proj``, ``fused_qkv_a_proj``, a layer's
    ``experts``) whose parts ``assignment`` (module name -> scheme, or None for kept) gives different
    values, each as a sentence. vLLM refuses such a checkpoint, or reads all parts with one part's
    scheme; transformers' MoE loaders hold one scheme per ``experts`` module too."""
    groups: dict[tuple[str, str], dict[str, set]] = {}
    for name, value in assignment.items():
        parts = name.split(".")
        if len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit():
            key = (".".join(parts[:-2]), "experts")
        elif parts[-1] in FUSED_IN_VLLM:
            key = (".".join(parts[:-1]), FUSED_IN_VLLM[parts[-1]])
        else:
            continue
        groups.setdefault(key, {}).setdefault(parts[-1], set()).add(value)
    return [
        f"{parent}: {'the projections' if fused == 'experts' else ', '.join(sorted(parts))} get different "
        f"schemes, and vLLM loads them as one {fused} module: give them one rule"
        for (parent, fused), parts in sorted(groups.items())
        if len(set().union(*parts.values())) > 1
    ]


# modules that serving engines build without quantization, whatever the checkpoint's config says, and
# the engines that do: the DeepSeek-V3.2 indexer's ``weights_proj`` gets no quant_config in vLLM and
# SGLang, nor do LFM2's short-convolution projections in vLLM (its ShortConv)
UNQUANTIZED_IN_ENGINES = {
    r"\.indexer\.weights_proj$": "vLLM and SGLang",
    r"\.conv\.(?:in|out)_proj$": "vLLM",
}


def engine_unquantized_modules(assignment: Mapping[str, Hashable]) -> list[str]:
    """The modules serving engines read only in full precision that ``assignment`` (module name ->
    scheme, or None for kept) quantizes, each as a sentence: an engine would find packed weights where
    its module has none."""
    return [
        f"{name}: {engines} load it only in full precision: keep it (a rule for it with scheme: null "
        "before the others, or a narrower pattern)"
        for name, value in sorted(assignment.items())
        if value is not None
        for pattern, engines in UNQUANTIZED_IN_ENGINES.items()
        if re.search(pattern, name)
    ]


def layer_prefix_rule(layers: list[int], stem: str = "model.layers.") -> str:
    """A regex for every module of whole decoder layers under ``stem`` (DeepSeek-V3's MTP layers, carried
    as they are; GLM-4.5V's under ``model.language_model.layers.``)."""
    numbers = "|".join(str(i) for i in sorted(layers))
    return "^" + _either_prefix(re.escape(stem)) + f"(?:{numbers})" + r"\."


def carried_rules(names: Iterable[str], num_layers: int) -> list[str]:
    """Regexes of the modules among a checkpoint's tensor ``names`` that are carried whole in full
    precision: MTP decoder layers past ``num_layers`` (DeepSeek-V3, GLM), top-level MTP blocks beside
    ``model`` and ``lm_head`` (Qwen3-Next's ``mtp.*``) or in it (ERNIE-4.5's ``model.mtp_block.*``...)
    and encoders beside the text model (Qwen3.5's ``model.visual.*``)."""
    layers: dict[str, set[int]] = {}  # stem (model.layers.) -> MTP layer numbers
    blocks = set()
    for name in names:
        if is_tower(name):
            blocks.add(next(tower for tower in TOWERS if name.startswith(tower)).rstrip("."))
        elif is_mtp(name, num_layers):
            index = layer_index(name)
            if index is not None:
                layers.setdefault(layer_prefix(name).removesuffix(f"{index}."), set()).add(index)
            else:  # mtp.*, or ERNIE's model.mtp_block.*, model.mtp_emb_norm.*...
                parts = name.split(".")
                blocks.add(".".join(parts[:2] if parts[0] == "model" else parts[:1]))
    rules = [layer_prefix_rule(sorted(numbers), stem) for stem, numbers in sorted(layers.items())]
    return rules + ["^" + _either_prefix(re.escape(block + ".")) for block in sorted(blocks)]


def _key(parts: list[str], keep: int) -> tuple[str | None, ...]:
    """The name's parts with every number after the first ``keep`` made a wildcard."""
    key: list[str | None] = []
    numbers = 0
    for part in parts:
        if part.isdigit():
            key.append(part if numbers < keep else _WILD)
            numbers += 1
        else:
            key.append(part)
    return tuple(key)


def _regex(key: tuple[str | None, ...], experts_as_layer: bool) -> str:
    pieces = [r"\d+" if part is _WILD else re.escape(part) for part in key]
    last = key[-1]
    if len(key) >= 3 and key[-3] == "experts" and (key[-2] is _WILD or key[-2].isdigit()):
        names = _alternatives(last, EXPERT_NAME_IN_VLLM.get(last))
        expert = rf"\.{pieces[-2]}\.{names}"
        body = r"\.".join(pieces[:-2]) + (f"(?:{expert})?" if experts_as_layer else expert)
    else:
        body = r"\.".join([*pieces[:-1], _alternatives(last, FUSED_IN_VLLM.get(last))])
    return f"^{_either_prefix(body)}$"


def _either_prefix(body: str) -> str:
    """A regex body that starts with a vision-language checkpoint's prefix, made to match the other
    loaders' names for it as well (``model.language_model.layers.0``, ``language_model.model.layers.0``
    or ``model.layers.0``)."""
    for ours, theirs in PREFIX_ALIASES.items():
        if body.startswith(re.escape(ours)):
            prefixes = "|".join(re.escape(prefix) for prefix in (ours, *theirs))
            return f"(?:{prefixes})" + body[len(re.escape(ours)) :]
    return body


def text_model_aliases(names: Iterable[str]) -> set[str]:
    """The names transformers gives a vision-language checkpoint's text modules among ``names`` when it
    loads the text model alone (``model.language_model.layers.0.x`` -> ``model.layers.0.x``; Nemotron-H's
    ``backbone.layers.0.x`` too), for ``ignore`` lists, which match names exactly."""
    return {text_model_name(name) for name in names if name.startswith((TEXT_MODEL, BACKBONE, INNER_LM))}


def _alternatives(name: str, alias: str | None) -> str:
    return re.escape(name) if alias is None else f"(?:{re.escape(name)}|{re.escape(alias)})"
