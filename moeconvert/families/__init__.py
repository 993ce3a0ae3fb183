"""Supported MoE families, looked up by ``config.json``'s ``model_type``."""

from __future__ import annotations

from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import CONFIG_MAPPING

from ..errors import UnsupportedModelError
from .afmoe import AFMOE
from .axk1 import AXK1
from .base import STACKS, UNGATED_STACKS, Family, block_of, in_block, is_stack_name
from .beam import BEAM
from .cohere import COHERE2_MOE
from .deepseek import DEEPSEEK_V2, DEEPSEEK_V3, DEEPSEEK_V32, DOTS1, SARVAM_MLA, SOLAR_OPEN
from .ernie import ERNIE4_5_MOE
from .exaone import EXAONE_MOE
from .flex_olmo import FLEX_OLMO
from .flint import FLINT
from .gemma import GEMMA4
from .glm import GLM4_MOE, GLM4_MOE_LITE, GLM4V_MOE, GLM_MOE_DSA
from .granite import GRANITEMOE, GRANITEMOE_SWA, GRANITEMOEHYBRID, GRANITEMOESHARED
from .hunyuan import HUNYUAN_V1_MOE, HY_V3
from .jamba import JAMBA
from .kolibri import KOLIBRI1
from .laguna import LAGUNA
from .lfm2 import LFM2_MOE
from .llama4 import LLAMA4
from .mellum import MELLUM
from .mimo import MIMO_V2_FLASH
from .minicpm import MINICPM5_MOE
from .minimax import MINIMAX_M2
from .mixtral import MIXTRAL
from .nemotron import NEMOTRON_H
from .olmoe import OLMOE
from .phimoe import PHIMOE
from .qwen_moe import QWEN2_MOE, QWEN3_5_MOE, QWEN3_MOE, QWEN3_NEXT, QWEN3_VL_MOE

FAMILIES: dict[str, Family] = {
    t: family
    for family in (
        MIXTRAL,
        AFMOE,
        QWEN2_MOE,
        QWEN3_MOE,
        QWEN3_NEXT,
        QWEN3_5_MOE,
        QWEN3_VL_MOE,
        COHERE2_MOE,
        HUNYUAN_V1_MOE,
        MINICPM5_MOE,
        AXK1,
        KOLIBRI1,
        FLINT,
        MIMO_V2_FLASH,
        LFM2_MOE,
        HY_V3,
        MELLUM,
        BEAM,
        LAGUNA,
        FLEX_OLMO,
        GEMMA4,
        LLAMA4,
        GRANITEMOE,
        GRANITEMOESHARED,
        GRANITEMOE_SWA,
        GRANITEMOEHYBRID,
        JAMBA,
        NEMOTRON_H,
        DEEPSEEK_V2,
        DEEPSEEK_V3,
        DEEPSEEK_V32,
        DOTS1,
        SARVAM_MLA,
        ERNIE4_5_MOE,
        EXAONE_MOE,
        GLM4_MOE,
        GLM4_MOE_LITE,
        GLM4V_MOE,
        GLM_MOE_DSA,
        MINIMAX_M2,
        OLMOE,
        PHIMOE,
        SOLAR_OPEN,
    )
    for t in family.model_types
}

__all__ = [
    "FAMILIES",
    "STACKS",
    "UNGATED_STACKS",
    "Family",
    "block_of",
    "family_for",
    "in_block",
    "is_stack_name",
    "load_config",
]


def family_for(config: dict[str, Any]) -> Family:
    """The family of a parsed ``config.json``, or a one-line error naming the supported ones."""
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        supported = ", ".join(sorted({family.name for family in FAMILIES.values()}))  # not text-only aliases
        what = f"model_type {model_type!r}" if model_type else "a config.json without model_type"
        raise UnsupportedModelError(
            f"{what} is not a supported MoE family (dense or unknown); supported: {supported}"
        )
    return family


def load_config(config: dict[str, Any]) -> Any:
    """The transformers config object of the text model in a ``config.json`` dict (built-in classes
    only, so that family code reads defaults the way the model does; no remote code is ever imported).

    For a vision-language checkpoint that is its ``text_config``: every command works on the text
    model and carries the other towers as they are.
    """
    family = family_for(config)
    try:  # values of the wrong type fail transformers' strict fields, a bad dtype torch's lookup
        loaded = CONFIG_MAPPING[config["model_type"]].from_dict(_special_floats(config)).get_text_config()
    except (TypeError, ValueError, AttributeError, StrictDataclassError) as err:
        message = " ".join(str(err).split())  # one line
        raise UnsupportedModelError(f"config.json of {family.name} model is invalid: {message}") from None
    problem = family.routing_problem(loaded)
    if problem:
        raise UnsupportedModelError(f"config.json of {family.name} model is invalid: {problem}")
    return loaded


def _special_floats(value: Any) -> Any:
    """``value`` with the floats JSON cannot hold decoded: transformers writes infinity and NaN into
    config.json as ``{"__float__": "Infinity"}`` (Granite 4.0's ``time_step_limit``), and reads them back
    so when it loads a model; so must every command."""
    if isinstance(value, dict):
        tag = value.get("__float__")
        if len(value) == 1 and tag in ("Infinity", "-Infinity", "NaN"):
            return float(tag.lower().replace("infinity", "inf"))
        return {k: _special_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_special_floats(v) for v in value]
    return value
