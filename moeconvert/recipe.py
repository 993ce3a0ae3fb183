r"""Recipes: proven settings per model, as YAML, applied with ``--recipe``; command-line flags win.

    model: mistralai/Mixtral-8x7B-v0.1
    scheme: {method: gptq, bits: 4, group_size: 128, sym: true}
    rules:                       # first match wins; regex searched in module names
      - {pattern: 'layers\.0\.', scheme: null}        # keep the first layer in full precision
      - {pattern: "self_attn", scheme: {bits: 8}}     # fields not given come from `scheme`
    calibration: {source: default, samples: 128, seq_len: 2048}
    format: compressed-tensors
    verify: {max_kl: 0.1, min_top1: 0.85, max_layer_error: 0.25}

Every key is checked: an unknown key, a wrong type or a bad value is an error naming the field, and a
rule whose pattern matches no module of the model, or that splits a module vLLM loads as one (q/k/v,
gate/up, a layer's experts), is refused when the run is planned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import BadInputError
from .quant.scheme import Scheme
from .quant.targets import Rule

_TYPES = {
    "bits": int,
    "group_size": int,
    "sym": bool,
    "method": str,
    "act_order": bool,
    "static_groups": bool,
    "damp": float,
    "block_size": int,
}
_CALIBRATION = {
    "source": str,
    "samples": int,
    "seq_len": int,
    "seed": int,
    "calibrate_all_experts": bool,
    "min_tokens": int,
}
_VERIFY = {"max_kl": float, "min_top1": float, "max_layer_error": float}
_LOWEST = {"samples": 1, "seq_len": 1, "min_tokens": 0}  # calibration counts
_TOP = {"model", "description", "scheme", "rules", "calibration", "format", "verify"}


@dataclass(frozen=True)
class Recipe:
    model: str | None = None
    description: str = ""
    scheme: Scheme = field(default_factory=Scheme)
    rules: tuple[Rule, ...] = ()
    calibration: dict[str, Any] = field(default_factory=dict)
    format: str | None = None
    verify: dict[str, float] = field(default_factory=dict)


def _check(value: Any, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadInputError(f"recipe field {where}: expected {kind.__name__}, got {value!r}")
    return value


def threshold_problem(name: str, value: float) -> str | None:
    """Why a parity threshold means nothing (NaN, below zero, a top-1 agreement above 1), or None. An
    infinite maximum is a check turned off."""
    if name == "min_top1" and not 0.0 <= value <= 1.0:
        return f"must be a fraction from 0 to 1, not {value}"
    if name != "min_top1" and not value >= 0.0:
        return f"must be a number of at least 0 (inf: no limit), not {value}"
    return None


def check_thresholds(thresholds: dict[str, float | None]) -> None:
    """Refuse, before any work, parity thresholds given to ``verify`` or ``quantize`` that mean nothing."""
    for name, value in thresholds.items():
        problem = None if value is None else threshold_problem(name, value)
        if problem:
            raise BadInputError(f"verify threshold {name} {problem}")


def _section(data: Any, allowed: dict[str, type], where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise BadInputError(f"recipe field {where}: expected a mapping, got {data!r}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise BadInputError(
            f"recipe field {where}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})"
        )
    return {key: _check(value, allowed[key], f"{where}.{key}") for key, value in data.items()}


def _scheme(data: Any, base: Scheme, where: str) -> Scheme:
    try:
        return replace(base, **_section(data, _TYPES, where))
    except ValueError as err:
        raise BadInputError(f"recipe field {where}: {err}") from None


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """A :class:`Recipe` from parsed YAML; raises BadInputError naming the offending field."""
    if not isinstance(data, dict):
        raise BadInputError(f"{source}: a recipe is a mapping of fields")
    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise BadInputError(f"recipe field {unknown[0]}: unknown key (allowed: {', '.join(sorted(_TOP))})")
    scheme = _scheme(data.get("scheme", {}), Scheme(), "scheme")
    rules = []
    for number, rule in enumerate(data.get("rules") or []):
        where = f"rules[{number}]"
        if not isinstance(rule, dict) or set(rule) - {"pattern", "scheme"} or "pattern" not in rule:
            raise BadInputError(f"recipe field {where}: expected {{pattern: REGEX, scheme: null | {{...}}}}")
        pattern = _check(rule["pattern"], str, f"{where}.pattern")
        try:
            re.compile(pattern)
        except re.error as err:
            raise BadInputError(f"recipe field {where}.pattern: invalid regex ({err})") from None
        target = None if rule.get("scheme") is None else _scheme(rule["scheme"], scheme, f"{where}.scheme")
        rules.append(Rule(pattern, target))
    return Recipe(
        model=_check(data["model"], str, "model") if "model" in data else None,
        description=_check(data.get("description", ""), str, "description"),
        scheme=scheme,
        rules=tuple(rules),
        calibration=_calibration(data.get("calibration", {})),
        format=_check(data["format"], str, "format") if "format" in data else None,
        verify=_thresholds(data.get("verify", {})),
    )


def _calibration(data: Any) -> dict[str, Any]:
    section = _section(data, _CALIBRATION, "calibration")
    for key, lowest in _LOWEST.items():
        if key in section and section[key] < lowest:
            raise BadInputError(
                f"recipe field calibration.{key}: must be at least {lowest}, not {section[key]}"
            )
    return section


def _thresholds(data: Any) -> dict[str, float]:
    section = _section(data, _VERIFY, "verify")
    for key, value in section.items():
        problem = threshold_problem(key, value)
        if problem:
            raise BadInputError(f"recipe field verify.{key}: {problem}")
    return section


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise BadInputError(f"cannot read recipe {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise BadInputError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_recipe(data, str(path))
