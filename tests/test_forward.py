"""Layer-at-a-time forward with transformers' modules reproduces the whole model's logits exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, load_model

from moeconvert.checkpoint import ShardedReader, layer_prefix
from moeconvert.families import family_for, load_config
from moeconvert.forward import LayerwiseModel, experts_implementation, on_device
from moeconvert.relayout import runtime_layer
from moeconvert.source import read_config
from moeconvert.tiny import build_tiny_model


def _layerwise(folder: Path, seed: int) -> tuple[LayerwiseModel, torch.Tensor, torch.Tensor, list[dict]]:
    """A model streamed by layer: the streamed model, random tokens, their embeddings, and each decoder
    layer's tensors (fused, named within the layer)."""
    raw = read_config(folder)
    fam, config = family_for(raw), load_config(raw)
    streamed = LayerwiseModel(load_config(raw))
    tokens = torch.randint(0, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(seed))
    with ShardedReader(folder) as reader:
        groups = reader.layer_names()
        streamed.load_top(reader.get_many(groups[None]))
        layers = []
        for index in range(config.num_hidden_layers):
            fused = runtime_layer(fam, config, index, reader.get_many(groups[index]))
            prefix = layer_prefix(groups[index][0])
            layers.append({name[len(prefix) :]: tensor.clone() for name, tensor in fused.items()})
    return streamed, tokens, streamed.embed(tokens), layers


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_forward_equals_model(family: str, tiny_models: dict[str, Path]) -> None:
    streamed, tokens, hidden, layers = _layerwise(tiny_models[family], seed=5)
    for index, local in enumerate(layers):
        with streamed.layer(index, local) as layer:
            hidden = streamed.run_layer(layer, hidden)
        assert all(p.is_meta for p in streamed.backbone.layers[index].parameters()), "layer must be freed"
    logits = streamed.logits(hidden)
    with torch.no_grad():  # the whole model with the routed-experts kernel the streamed one runs
        whole = load_model(tiny_models[family], experts_implementation(streamed.device))
        expected = whole(tokens).logits
    assert torch.equal(expected, logits)


def test_each_layer_gets_the_mask_of_its_attention_kind(tmp_path: Path) -> None:
    """A model that mixes sliding-window and full attention (Qwen2-MoE's layer_types, a window of 6 of
    the 20 tokens) hands each kind of layer its own mask; the streamed model must too."""
    folder = build_tiny_model(
        "qwen2_moe",
        tmp_path / "windowed",
        seed=4,
        use_sliding_window=True,
        sliding_window=6,
        max_window_layers=3,
    )
    config = load_config(read_config(folder))
    assert config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    test_streamed_forward_equals_model("qwen2_moe", {"qwen2_moe": folder})


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_finishes_from_its_residual_stream(family: str, tiny_models: dict[str, Path]) -> None:
    """quantize's output pass may skip an attention it computed already: the layer's second half, run
    from the residual stream captured by the first pass, gives the layer's own output bit for bit. Where
    attention and MLP run side by side on one input (Cohere's), attention hands state on to the next
    layer (GLM-5's token picks, which the residual stream does not hold), or the parts join the residual
    stream otherwise (weighed by depth in Beam's, normed after the MLP in FlexOlmo's, scaled in Granite's),
    the layer runs whole."""
    whole_only = family in (
        "cohere2_moe",
        "glm_moe_dsa",
        "beam",
        "flex_olmo",
        "granitemoe",
        "granitemoeshared",
        "granitemoehybrid",
        "jamba",
        "nemotron_h",  # one mixer per layer: attention, Mamba or MLP, never both
    )
    assert_layers_finish_from_residual(tiny_models[family], halves=not whole_only)


def assert_layers_finish_from_residual(folder: Path, halves: bool) -> None:
    """Each layer of the model in ``folder`` has a second half (``halves``) or runs whole; where it has
    one, that half run from the captured residual stream gives the layer's output bit for bit."""
    streamed, _, hidden, layers = _layerwise(folder, seed=6)
    for index, local in enumerate(layers):
        captured: list[torch.Tensor | None] = []
        with streamed.layer(index, local) as layer:
            assert streamed.has_mlp_half(layer) == halves
            if not halves:
                continue
            with streamed.capture_residual(layer, captured):
                whole = streamed.run_layer(layer, hidden)
            assert len(captured) == 1 and not torch.equal(captured[0], hidden)
            assert torch.equal(streamed.run_mlp_half(layer, captured[0]), whole)
        hidden = whole


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("device", _devices())
def test_weights_reach_the_device_in_the_requested_dtype_with_the_same_bits(device: str) -> None:
    """Layers go to the forward pass's device moved before they are widened (and narrowed before they
    are moved): the values are those of a plain conversion, whichever side converts."""
    gen = torch.Generator().manual_seed(0)
    bf16 = (torch.randn(64, 48, generator=gen) * 3).to(torch.bfloat16)
    fp32 = torch.randn(64, 48, generator=gen) / 7
    index = torch.arange(48, dtype=torch.int32)
    target = torch.device(device)
    for source, dtype in [
        (bf16, torch.float32),
        (fp32, torch.bfloat16),
        (fp32, torch.float16),
        (index, torch.float32),
    ]:
        moved = on_device(source, target, dtype)
        expected = source.to(dtype) if source.is_floating_point() else source
        assert moved.device.type == target.type and moved.dtype == expected.dtype
        assert torch.equal(moved.cpu(), expected)
    assert on_device(fp32, torch.device("cpu"), torch.float32) is fp32  # nothing to do: no copy
