"""The model card (``README.md``) of a quantized checkpoint: Hub metadata plus what was done and how well.

The card is built only from files in the output folder (``config.json``, ``quantization_report.json`` and,
once verified, the parity report), so it can be written with the output, rewritten after the parity
check, and rebuilt by ``push`` for an older folder. Users read it to decide whether to trust the weights:
it says how they were made (method, calibration, what stayed in full precision), how far the outputs moved
from the original, and how to load and serve them.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .families import FAMILIES
from .manifest import update_manifest
from .quant.calibration import hub_dataset_id
from .units import size_text
from .verify import report_json, report_path

CARD_NAME = "README.md"
REPORT_NAME = "quantization_report.json"

_LOADING = {
    "compressed-tensors": """\
```python
# pip install transformers compressed-tensors
from transformers import {model_class}, {io_class}

model = {model_class}.from_pretrained("{repo}"{rev_py}, dtype="auto", device_map="auto")
{io_name} = {io_class}.from_pretrained("{repo}"{rev_py})
```
{text_alone}
Serve it with vLLM, which reads the compressed-tensors config as it is:

```bash
vllm serve {repo}{rev_cli}
```""",
    # transformers reads the model's experts only stacked, not per expert as the output stores them
    "compressed-tensors-engines": """\
Serve it with vLLM, which reads the compressed-tensors config as it is:

```bash
vllm serve {repo}{rev_cli}
```

transformers reads this model's experts only stacked, not per expert as this folder stores them (the
layout vLLM reads): loaded with transformers, they would be left randomly initialized.""",
    "gptq": """\
This folder uses the GPTQ v1 layout (`qweight`/`qzeros`/`scales`/`g_idx` with `quantize_config.json`),
with the source checkpoint's tensor names. Serve it with vLLM, which picks its GPTQ (Marlin) kernels
from the config:

```bash
vllm serve {repo}{rev_cli}
```

GPTQModel loads it too (`GPTQModel.load("{repo}"{rev_py})`); plain transformers loads GPTQ only through
optimum + gptqmodel.""",
    "fused": """\
This is moeconvert's fused layout (one `[experts, ...]` tensor per projection and layer); serving engines
do not read it. Load it as a transformers model with the weights dequantized:

```python
# pip install moeconvert
from moeconvert.formats.fused import load_fused

model = load_fused("path/to/this/folder")
```""",
}


# the transformers example's classes, for a causal LM and for a vision-language model
_CAUSAL_LM = {
    "model_class": "AutoModelForCausalLM",
    "io_class": "AutoTokenizer",
    "io_name": "tokenizer",
    "text_alone": "",
}
_VISION_LANGUAGE = {
    "model_class": "AutoModelForImageTextToText",
    "io_class": "AutoProcessor",
    "io_name": "processor",
    "text_alone": "\nFor text alone, `AutoModelForCausalLM` loads just the text model (the vision encoder stays on disk).\n",
}


def library_versions() -> dict[str, str]:
    """Versions of the packages whose code decides the output's bytes (recorded for provenance)."""
    versions = {}
    for package in ("moeconvert", "torch", "transformers", "compressed-tensors", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_card(folder: Path, repo_id: str | None = None, revision: str | None = None) -> Path:
    """(Re)write ``folder/README.md`` from the folder's config and reports; ``repo_id`` and ``revision``
    (a branch) go into the loading examples (the folder's own name stands in until it is pushed)."""
    report = json.loads((folder / REPORT_NAME).read_text())
    config = json.loads((folder / "config.json").read_text())
    verify_path = report_path(folder)
    parity = json.loads(verify_path.read_text()) if verify_path.exists() else report.get("verify")
    card = build_card(report, config, parity, repo_id or folder.name, revision)
    path = folder / CARD_NAME
    staged = path.with_name(f".{CARD_NAME}.tmp")
    staged.write_text(str(card), encoding="utf-8")
    os.replace(staged, path)
    return path


def record_parity(folder: Path, parity: dict[str, Any]) -> None:
    """Store a parity report in a quantized output folder and rewrite the card that quotes it (and their
    lines of ``SHA256SUMS``): the card then says how far these weights moved, whoever ran the check."""
    path = report_path(folder)
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(report_json(parity) + "\n")
    os.replace(staged, path)
    write_card(folder)
    update_manifest(folder, [CARD_NAME, path.name])


def build_card(
    report: dict[str, Any],
    config: dict[str, Any],
    parity: dict[str, Any] | None,
    repo: str,
    revision: str | None = None,
) -> ModelCard:
    """The card for a quantize ``report`` (``QuantizeReport.to_dict()`` as stored beside the weights)."""
    data = card_metadata(report, config)
    body = "\n\n".join(
        [
            _title(report),
            _summary(report),
            _quantization_table(report),
            _parity_section(parity),
            "## How to use\n\n" + _how_to_load(report["format"], repo, revision, config),
            _provenance(report),
        ]
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def is_vision_language(config: dict[str, Any]) -> bool:
    """Whether ``config.json`` is a vision-language model's (Qwen3.5: a text model beside a vision
    encoder), which transformers loads as image-text-to-text, not as a causal LM."""
    return isinstance(config.get("vision_config"), dict)


def _text_model_loads_alone(config: dict[str, Any]) -> bool:
    """Whether transformers has a causal LM for the model's text part (Qwen3.5's; not GLM-4.5V's)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _how_to_load(fmt: str, repo: str, revision: str | None, config: dict[str, Any]) -> str:
    classes = _CAUSAL_LM
    if is_vision_language(config):
        classes = {**_VISION_LANGUAGE, **({} if _text_model_loads_alone(config) else {"text_alone": ""})}
    family = FAMILIES.get(config.get("model_type"))
    if fmt == "compressed-tensors" and family is not None and not family.transformers_reads_per_expert:
        fmt = "compressed-tensors-engines"
    text = _LOADING[fmt]
    for key, value in classes.items():
        text = text.replace("{" + key + "}", value)
    text = text.replace("{repo}", repo)
    text = text.replace("{rev_py}", f', revision="{revision}"' if revision else "")
    return text.replace("{rev_cli}", f" --revision {revision}" if revision else "")


def card_metadata(report: dict[str, Any], config: dict[str, Any]) -> ModelCardData:
    """The YAML front matter the Hub indexes: lineage, license, calibration data and search tags."""
    scheme, source = report["scheme"], report.get("source") or {}
    base = source.get("id")
    dataset = hub_dataset_id(report["calibration"].get("source"))
    license_fields = {k: source[k] for k in ("license_name", "license_link") if k in source}
    tags = ["moe", "moeconvert", scheme["method"], f"{scheme['bits']}-bit", f"int{scheme['bits']}"]
    tags += [config.get("model_type", "unknown"), report["format"]]
    return ModelCardData(
        base_model=base,
        license=source.get("license"),
        datasets=[dataset] if dataset else None,
        library_name="transformers",
        pipeline_tag="image-text-to-text" if is_vision_language(config) else "text-generation",
        tags=list(dict.fromkeys(tags)),
        **({"base_model_relation": "quantized"} if base else {}),
        **license_fields,
    )


def _source_name(report: dict[str, Any]) -> str:
    source = report.get("source") or {}
    return source.get("id") or Path(report["model"]).name


def _title(report: dict[str, Any]) -> str:
    scheme = report["scheme"]
    return f"# {_source_name(report)}: {scheme['bits']}-bit {scheme['method'].upper()} ({report['format']})"


def _summary(report: dict[str, Any]) -> str:
    source = report.get("source") or {}
    base = source.get("id")
    origin = f"[{base}](https://huggingface.co/{base})" if base else f"`{report['model']}`"
    if base and source.get("revision"):
        origin += f" (revision `{source['revision']}`)"
    sizes = report.get("sizes") or {}
    text = (
        f"{origin} quantized per expert with moeconvert: every expert of every MoE layer, and the attention and "
        f"dense projections, hold {report['scheme']['bits']}-bit integer weights; routers, norms, embeddings "
        f"and the output head stay in full precision."
    )
    if sizes.get("source_bytes") and sizes.get("output_bytes"):
        before, after = sizes["source_bytes"], sizes["output_bytes"]
        text += (
            f" Weights: {size_text(before)} before, {size_text(after)} after ({before / after:.2f}x smaller)."
        )
    return text


def _quantization_table(report: dict[str, Any]) -> str:
    scheme, calib = report["scheme"], report["calibration"]
    group = "per output channel" if scheme["group_size"] == -1 else str(scheme["group_size"])
    rows = [
        ("method", scheme["method"].upper() + _order(scheme)),
        ("bits", str(scheme["bits"])),
        ("group size", group),
        ("symmetric", "yes" if scheme["sym"] else "no"),
        ("format", report["format"]),
        ("quantized modules", str(report["quantized_modules"])),
        ("full precision", _kept(report)),
    ]
    if scheme["method"] == "gptq":
        tokens = calib["samples"] * calib["seq_len"]
        rows += [
            ("GPTQ dampening", f"{scheme['damp']:g}"),
            ("calibration data", _calibration_name(calib.get("source"))),
            ("calibration samples", f"{calib['samples']} x {calib['seq_len']} tokens ({tokens:,} tokens)"),
            ("calibration routing", "each expert is calibrated on the tokens its router sends it"),
        ]
    lines = ["## Quantization", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _order(scheme: dict[str, Any]) -> str:
    """How GPTQ ordered its columns, for the method row."""
    if scheme["method"] != "gptq" or not scheme.get("act_order"):
        return ""
    return " (act-order, static groups)" if scheme.get("static_groups", False) else " (act-order)"


def _kept(report: dict[str, Any]) -> str:
    kept = "routers, norms, embeddings, lm_head"
    extra = len(report.get("kept_modules") or [])
    return kept + (
        f" and {extra} Linear modules kept by the rules (listed in `{REPORT_NAME}`)" if extra else ""
    )


def _calibration_name(source: str | None) -> str:
    if source in (None, "default"):
        return "moeconvert's built-in English text corpus"
    dataset = hub_dataset_id(source)
    return (
        f"[{dataset}](https://huggingface.co/datasets/{dataset}) (`{source}`)" if dataset else f"`{source}`"
    )


def _parity_section(parity: dict[str, Any] | None) -> str:
    if parity is None:
        return (
            "## Parity with the original\n\nNot verified: no parity report was stored with this output "
            "(`--no-verify`, or a check that did not finish). `moeconvert verify ORIGINAL THIS_FOLDER --store` "
            "checks it and records the result here."
        )
    t = parity["thresholds"]
    worst = parity.get("worst_layer")
    worst_error = next((p["layer_error"] for p in parity["layers"] if p["layer"] == worst), None)
    rows = [
        ("result", "passed" if parity["passed"] else "**failed**: " + "; ".join(parity["failures"])),
        ("tokens compared", f"{parity['tokens']:,} on {parity['device']}"),
        ("mean KL(original ‖ quantized)", f"{_number(parity['kl_mean'], '.3e')} (limit {t['max_kl']:g})"),
        ("median / 99th percentile / max KL", _kl_spread(parity)),
        ("top-1 agreement", f"{_number(parity['top1_agreement'], '.4f')} (limit {t['min_top1']:g})"),
        (
            "perplexity",
            f"{_number(parity['perplexity_original'], '.4f')} → {_number(parity['perplexity_converted'], '.4f')}",
        ),
        ("max \\|logits diff\\|", _number(parity["logits_max_abs_diff"], ".3e")),
    ]
    if worst is not None:
        rows.append(
            (
                "worst layer error",
                f"{_number(worst_error, '.3e')} (layer {worst}, limit {t['max_layer_error']:g})",
            )
        )
    lines = [
        "## Parity with the original",
        "",
        "Measured by `moeconvert verify`: both models run layer by layer on the same held-out text.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _kl_spread(parity: dict[str, Any]) -> str:
    spread = [parity.get("kl_median", "n/a"), parity.get("kl_p99", "n/a"), parity["kl_max"]]  # older reports
    return " / ".join(_number(v, ".3e") for v in spread)


def _number(value: float | str | None, spec: str) -> str:
    """A metric as the report holds it: null where the converted model's outputs were not finite."""
    if isinstance(value, str):
        return value
    return "not finite" if value is None else format(value, spec)


def _provenance(report: dict[str, Any]) -> str:
    calib = report["calibration"]
    versions = report.get("versions") or {}
    rows = [f"- {name} {version}" for name, version in versions.items()]
    rows.append(f"- seed {calib['seed']}")
    if calib.get("tokens_sha256"):
        rows.append(f"- calibration tokens sha256 `{calib['tokens_sha256']}`")
    rows.append(f"- device {report['device']}")
    return "## Provenance\n\n" + "\n".join(rows) + f"\n\nThe full record is in `{REPORT_NAME}`."
