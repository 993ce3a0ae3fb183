"""``verify``: does the converted checkpoint still compute what the original does?

Both models advance one decoder layer at a time on the same tokens, so a model that fits once fits
here too (about two layers resident). Per layer we report the converted layer's error on the
*original's* input (that layer alone) and the drift of the converted model's own hidden state
(accumulated). At the end: logits difference, KL(original || converted) per token, top-1 agreement and
the perplexity of both. Converted checkpoints are decoded by the libraries that define their formats
where one exists (compressed-tensors by the compressed-tensors package), so a packing bug cannot cancel
itself out.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import ShardedReader, iter_groups, layer_prefix
from .errors import BadInputError
from .families import family_for, load_config
from .forward import LayerwiseModel
from .fp8 import open_reader, source_dtype, without_fp8_config
from .memory import release_freed_memory
from .progress import progress_bar
from .quant.calibration import calibration_tokens, positions_note
from .quant.packing import unpack_gptq
from .recipe import check_thresholds
from .relayout import model_shapes, runtime_layer
from .source import read_config, resolve_model

# Default pass/fail thresholds by kind of conversion (see docs/PARITY.md for the measurements behind them).
# max_layer_error bounds each layer's own error relative to what it adds to the residual stream.
THRESHOLDS: dict[str, dict[str, float]] = {
    "lossless": {"max_kl": 0.0, "min_top1": 1.0, "max_layer_error": 0.0},
    "int8": {"max_kl": 0.01, "min_top1": 0.95, "max_layer_error": 0.05},
    "int4": {"max_kl": 0.1, "min_top1": 0.85, "max_layer_error": 0.25},
}

Decoder = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class LayerParity:
    layer: int
    layer_error: float  # ||converted(x) - orig(x)|| / ||orig(x) - x||, x = the original's input: error
    # relative to what the layer adds to the residual stream, so layers compare with each other
    drift: float  # ||converted running state - original running state|| / ||original||
    identical_tensors: bool | None = None  # lossless conversions only


@dataclass
class ParityReport:
    original: str
    converted: str
    kind: str
    device: str
    tokens: int
    thresholds: dict[str, float]
    layers: list[LayerParity] = field(default_factory=list)
    logits_max_abs_diff: float = 0.0
    logits_mean_abs_diff: float = 0.0
    kl_mean: float = 0.0
    kl_max: float = 0.0
    # The mean is often carried by a handful of knife-edge tokens; the median and 99th percentile show
    # how the bulk of the tokens moved.
    kl_median: float = 0.0
    kl_p99: float = 0.0
    top1_agreement: float = 1.0
    perplexity_original: float = 0.0
    perplexity_converted: float = 0.0
    worst_layer: int | None = None
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


# ------------------------------------------------------------------------------------ decoding a checkpoint


def conversion_kind(config: dict[str, Any]) -> str:
    """ "lossless", "int8" or "int4" from a converted checkpoint's quantization_config."""
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method")
    if method is None:
        return "lossless"
    if method == "compressed-tensors":
        bits = [g["weights"]["num_bits"] for g in quant.get("config_groups", {}).values() if g.get("weights")]
    elif method == "gptq":
        bits = [
            quant["bits"],
            *(v.get("bits", quant["bits"]) for v in (quant.get("dynamic") or {}).values() if v),
        ]
    elif method == "moeconvert":
        bits = [m["num_bits"] for m in quant.get("modules", {}).values()]
    else:
        raise BadInputError(f"cannot verify checkpoints quantized with {method!r}")
    return "int4" if min(bits, default=8) <= 4 else "int8"


def checkpoint_decoder(config: dict[str, Any], dtype: torch.dtype) -> Decoder:
    """A function turning one layer's stored tensors into plain ``.weight`` tensors (any layout)."""
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors_decoder(quant)
    if method == "gptq":
        return lambda tensors: _decode_modules(
            tensors, ("qweight", "qzeros", "scales", "g_idx"), _gptq_decode(quant, dtype)
        )
    if method == "moeconvert":
        from .formats.fused import dequantize_fused

        return lambda tensors: dequantize_fused(tensors, quant["modules"])
    return lambda tensors: tensors


def _decode_modules(
    tensors: dict[str, torch.Tensor],
    keys: tuple[str, ...],
    decode: Callable[[str, dict[str, torch.Tensor]], torch.Tensor],
) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    marker = "." + keys[0]
    for name in [n for n in tensors if n.endswith(marker)]:
        module = name[: -len(marker)]
        parts = {k: out.pop(f"{module}.{k}") for k in keys if f"{module}.{k}" in out}
        out[module + ".weight"] = decode(module, parts)
    return out


def _gptq_decode(
    quant: dict[str, Any], dtype: torch.dtype
) -> Callable[[str, dict[str, torch.Tensor]], torch.Tensor]:
    def decode(module: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        bits = quant["bits"]
        for pattern, override in (quant.get("dynamic") or {}).items():  # the first match decides, as in vLLM
            if re.match(pattern[2:] if pattern[:2] in ("+:", "-:") else pattern, module):
                bits = override.get("bits", bits)  # "-:" rules hold {}
                break
        return unpack_gptq(parts, bits).dequantize().to(dtype)

    return decode


def _compressed_tensors_decoder(quant: dict[str, Any]) -> Decoder:
    try:
        from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
        from compressed_tensors.quantization import QuantizationScheme
    except ImportError:
        raise BadInputError(
            "verifying compressed-tensors checkpoints needs: pip install compressed-tensors"
        ) from None
    groups = [QuantizationScheme(**{**g, "targets": g["targets"]}) for g in quant["config_groups"].values()]

    def scheme_for(module: str) -> Any:
        for group in groups:
            for target in group.targets:
                if (
                    target == "Linear"
                    or (target.startswith("re:") and re.match(target[3:], module))
                    or target == module
                ):
                    return group
        raise BadInputError(f"{module} is packed but no config group of quantization_config targets it")

    def decode(module: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return PackedQuantizationCompressor.decompress(parts, scheme_for(module))["weight"]

    keys = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
    return lambda tensors: _decode_modules(tensors, keys, decode)


# ------------------------------------------------------------------------------------------ the parity run


class _Side:
    """One model of the comparison: its reader, decoder and layer-streamed transformers model."""

    def __init__(self, model: str, device: torch.device, revision: str | None, token: str | None) -> None:
        self.folder = resolve_model(model, revision, token)
        stored = read_config(self.folder)
        self.raw_config = without_fp8_config(stored)
        self.family = family_for(self.raw_config)
        plain = {k: v for k, v in self.raw_config.items() if k != "quantization_config"}
        self.config = load_config(plain)
        self.reader: ShardedReader = open_reader(self.folder, stored)
        self.decode = checkpoint_decoder(self.raw_config, source_dtype(self.raw_config))
        self.streamed = LayerwiseModel(load_config(plain), device)
        self.groups = dict(iter_groups(self.reader))

    def top(self) -> dict[str, torch.Tensor]:
        return self.decode(self.reader.get_many(self.groups.get(None, [])))

    def prefetch(self, index: int) -> None:
        """Start reading layer ``index`` off disk (a hint to the OS; see ShardedReader.prefetch)."""
        self.reader.prefetch(self.groups[index])

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        """Layer ``index`` in runtime names (fused experts), dequantized, relative to the layer."""
        prefix = layer_prefix(self.groups[index][0])
        tensors = self.decode(self.reader.get_many(self.groups[index]))
        tensors = runtime_layer(self.family, self.config, index, tensors)
        return {n[len(prefix) :]: t for n, t in tensors.items()}


def _check_same_architecture(a: _Side, b: _Side, original: str, converted: str) -> None:
    """The two configs must build the same transformers model: same family and every tensor's shape."""
    if a.family is not b.family:
        raise BadInputError(f"{converted} is not a conversion of {original} (families differ)")
    shapes_a, shapes_b = model_shapes(a.config), model_shapes(b.config)
    for name in sorted(shapes_a.keys() | shapes_b.keys()):
        if shapes_a.get(name) != shapes_b.get(name):
            raise BadInputError(
                f"{converted} is not a conversion of {original} ({name}: {shapes_b.get(name)} against "
                f"{shapes_a.get(name)} in the original's config)"
            )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def verify(
    original: str,
    converted: str,
    *,
    device: str = "auto",
    calib: str | None = None,
    samples: int = 8,
    seq_len: int = 256,
    seed: int = 1,
    max_kl: float | None = None,
    min_top1: float | None = None,
    max_layer_error: float | None = None,
    revision: str | None = None,
    token: str | None = None,
    progress: bool = True,
    store: bool = False,
) -> ParityReport:
    """Compare CONVERTED against ORIGINAL layer by layer and at the logits.

    Thresholds default by kind (lossless re-layouts must be bit-identical; see :data:`THRESHOLDS`).
    The report's ``failures`` list what exceeded them; ``passed`` is False then (the CLI exits 1).
    ``store``: CONVERTED is a local ``quantize`` output, and the report goes into it, passed or not, with
    a model card that quotes it (an output made with ``--no-verify`` is then verified on its card).

    Raises:
        MoeConvertError: a model is missing, unsupported, or the two do not describe the same architecture.
    """
    from .pipeline import resolve_device

    started = time.perf_counter()
    overrides = {"max_kl": max_kl, "min_top1": min_top1, "max_layer_error": max_layer_error}
    check_thresholds(overrides)
    if store:
        _check_storable(converted)
    dev = resolve_device(device)
    a, b = _Side(original, dev, revision, None), _Side(converted, dev, None, None)
    _check_same_architecture(a, b, original, converted)
    kind = conversion_kind(b.raw_config)
    thresholds = dict(THRESHOLDS[kind])
    thresholds.update({k: v for k, v in overrides.items() if v is not None})
    note = positions_note(seq_len, a.config)
    if note:
        print(note, file=sys.stderr)
    tokens = calibration_tokens(calib, a.folder, a.config.vocab_size, samples, seq_len, seed)
    report = ParityReport(original, converted, kind, str(dev), tokens.numel(), thresholds)
    batches = tokens.split(max(1, 8192 // seq_len))
    a.streamed.load_top(a.top())
    b.streamed.load_top(b.top())
    hidden_a = [a.streamed.embed(t) for t in batches]
    hidden_b = [b.streamed.embed(t) for t in batches]
    layers = a.config.num_hidden_layers
    with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as prefetcher:
        for index in progress_bar(range(layers), unit="layer", desc="verify", show=progress):
            if index + 1 < layers:  # both models' next layer comes off disk while this one runs
                prefetcher.submit(a.prefetch, index + 1)
                prefetcher.submit(b.prefetch, index + 1)
            hidden_a, hidden_b, parity = _compare_layer(a, b, index, hidden_a, hidden_b, kind == "lossless")
            report.layers.append(parity)
            release_freed_memory()
    _logit_metrics(report, a, b, batches, hidden_a, hidden_b)
    _judge(report)
    report.seconds = time.perf_counter() - started
    a.reader.close()
    b.reader.close()
    if store:
        from .card import record_parity

        record_parity(Path(converted), report.to_dict())
    return report


def _check_storable(converted: str) -> None:
    """Before the comparison: a report is stored only in a local folder that ``quantize`` wrote."""
    from .card import REPORT_NAME

    if not (Path(converted) / REPORT_NAME).is_file():
        raise BadInputError(
            f"--store writes into a local quantize output, and {converted} has no {REPORT_NAME}"
        )


def _compare_layer(
    a: _Side, b: _Side, index: int, hidden_a: list[torch.Tensor], hidden_b: list[torch.Tensor], lossless: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor], LayerParity]:
    tensors_a, tensors_b = a.layer(index), b.layer(index)
    identical = None
    if lossless:
        identical = sorted(tensors_a) == sorted(tensors_b) and all(
            tensors_a[n].dtype == tensors_b[n].dtype
            and torch.equal(tensors_a[n].view(torch.uint8), tensors_b[n].view(torch.uint8))
            for n in tensors_a
        )
    same_attention = _same_outside_mlp(tensors_a, tensors_b, a.streamed.dtype, a.family.block)
    with a.streamed.layer(index, tensors_a) as layer_a, b.streamed.layer(index, tensors_b) as layer_b:
        residuals: list[torch.Tensor | None] = []
        finish_b = (
            same_attention
            and a.streamed.dtype == b.streamed.dtype
            and a.streamed.has_mlp_half(layer_a)
            and b.streamed.has_mlp_half(layer_b)
        )
        with a.streamed.capture_residual(layer_a, residuals) if finish_b else contextlib.nullcontext():
            next_a = [a.streamed.run_layer(layer_a, h) for h in hidden_a]
        if finish_b:  # b's attention is a's: b's layer on a's input goes on from a's residual stream
            alone = [b.streamed.run_mlp_half(layer_b, r) for r in residuals]
        else:
            alone = [b.streamed.run_layer(layer_b, h) for h in hidden_a]
        del residuals
        next_b = [b.streamed.run_layer(layer_b, h) for h in hidden_b]
    ref = torch.cat([h.flatten() for h in next_a])
    update = ref - torch.cat([h.flatten() for h in hidden_a])  # what the layer adds to the residual stream
    error = torch.cat([h.flatten() for h in alone]) - ref
    parity = LayerParity(
        index,
        layer_error=float(error.norm() / update.norm().clamp(min=1e-30)),
        drift=_rel(torch.cat([h.flatten() for h in next_b]), ref),
        identical_tensors=identical,
    )
    return next_a, next_b, parity


def _same_outside_mlp(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], dtype: torch.dtype, block: str
) -> bool:
    """Whether two layers have the same weights outside their MLP ``block`` (attention, norms) once
    loaded in ``dtype``: a conversion that quantized only the MLP or experts."""
    outside = sorted(n for n in a if not n.startswith(block + "."))
    return outside == sorted(n for n in b if not n.startswith(block + ".")) and all(
        a[n].is_floating_point() == b[n].is_floating_point()
        and torch.equal(_loaded(a[n], dtype), _loaded(b[n], dtype))
        for n in outside
    )


def _loaded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _logit_metrics(
    report: ParityReport,
    a: _Side,
    b: _Side,
    batches: tuple[torch.Tensor, ...],
    hidden_a: list[torch.Tensor],
    hidden_b: list[torch.Tensor],
) -> None:
    kl_sum = kl_max = agree = diff_sum = diff_max = nll_a = nll_b = 0.0
    count = predicted = 0
    per_token: list[torch.Tensor] = []
    for tokens, ha, hb in zip(batches, hidden_a, hidden_b, strict=True):
        logits_a, logits_b = a.streamed.logits(ha).float(), b.streamed.logits(hb).float()
        la, lb = logits_a.log_softmax(-1), logits_b.log_softmax(-1)
        raw = (logits_a - logits_b).abs()
        kl = (la.exp() * (la - lb)).sum(-1)
        kl_sum, kl_max = kl_sum + float(kl.sum()), _worst(kl_max, float(kl.max()))
        per_token.append(kl.flatten().double().cpu())
        agree += float((la.argmax(-1) == lb.argmax(-1)).sum())
        diff_sum, diff_max = diff_sum + float(raw.sum()), _worst(diff_max, float(raw.max()))
        count += kl.numel()
        target = tokens[:, 1:].to(la.device)
        nll_a -= float(la[:, :-1].gather(-1, target[..., None]).sum())
        nll_b -= float(lb[:, :-1].gather(-1, target[..., None]).sum())
        predicted += target.numel()
    vocab = a.config.vocab_size
    report.kl_mean, report.kl_max = kl_sum / count, kl_max
    every = torch.cat(per_token)
    report.kl_median, report.kl_p99 = float(every.median()), float(every.quantile(0.99))
    report.top1_agreement = agree / count
    report.logits_mean_abs_diff, report.logits_max_abs_diff = diff_sum / (count * vocab), diff_max
    report.perplexity_original = math.exp(nll_a / max(predicted, 1))
    report.perplexity_converted = math.exp(nll_b / max(predicted, 1))


def _judge(report: ParityReport) -> None:
    """Record every threshold the conversion misses. Each test is written so that NaN fails it: a
    converted model with NaN in its outputs is broken, not within tolerance."""
    worst = max(report.layers, key=lambda p: _or_inf(p.layer_error), default=None)
    report.worst_layer = worst.layer if worst else None
    where = f" (largest single-layer error at layer {worst.layer}: {worst.layer_error:.2e})" if worst else ""
    if report.kind == "lossless":
        changed = [p.layer for p in report.layers if p.identical_tensors is False]
        if changed:
            report.failures.append(f"tensors differ from the original in layer(s) {changed}")
        if report.logits_max_abs_diff != 0.0 and report.device == "cpu":
            report.failures.append(f"logits differ (max abs diff {report.logits_max_abs_diff:.3e}){where}")
        if report.device != "cpu" and not report.kl_mean <= 1e-6:
            report.failures.append(
                f"mean KL {_show(report.kl_mean)} on {report.device} for a lossless conversion{where}"
            )
        return
    limits = report.thresholds
    broken = [p.layer for p in report.layers if not p.layer_error <= limits["max_layer_error"]]
    if broken:
        report.failures.append(
            f"layer(s) {broken} err by more than {limits['max_layer_error']:g} of their own output "
            f"(worst: layer {worst.layer}, {worst.layer_error:.3f})"
        )
    if not report.kl_mean <= limits["max_kl"]:
        report.failures.append(f"mean KL {_show(report.kl_mean)} > {limits['max_kl']:g}{where}")
    if not report.top1_agreement >= limits["min_top1"]:
        report.failures.append(f"top-1 agreement {report.top1_agreement:.4f} < {limits['min_top1']:g}{where}")


def _worst(a: float, b: float) -> float:
    """The larger, or NaN if either is (Python's ``max`` drops a NaN second argument)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _or_inf(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _show(value: float) -> str:
    return (
        f"{value:.3e}" if math.isfinite(value) else f"{value} (the converted model's logits are not finite)"
    )


def report_json(data: Any) -> str:
    """``data`` as strict JSON: NaN and infinities, which a broken conversion's metrics can be and which
    ``json`` would write as the non-standard ``NaN``/``Infinity``, become null (the failures say why)."""

    def strict(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [strict(v) for v in value]
        return value

    return json.dumps(strict(data), indent=2, allow_nan=False)


def report_path(folder: Path) -> Path:
    return Path(folder) / "verify_report.json"
