"""Families whose releases store experts in transformers' runtime layout (Granite SWA's, Gemma 4's, and
Llama 4's, stacked transposed): the release is what ``fuse`` writes, ``unfuse`` writes the per-expert
names vLLM reads, and ``quantize`` stores experts one per expert under those names, from the release
as it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    RUNTIME_RELEASES,
    dequantized_state,
    eval_tokens,
    invoke_cli,
    load_model,
    load_tensors,
    mean_kl,
    token_kl,
)
from test_bad_input import assert_clean_failure
from test_forward import _layerwise, assert_layers_finish_from_residual

from moeconvert import UnsupportedModelError, fuse, inspect_model, quantize, unfuse, verify
from moeconvert.card import build_card
from moeconvert.families import family_for, load_config
from moeconvert.forward import experts_implementation
from moeconvert.pipeline import QuantizeOptions
from moeconvert.quant.scheme import Scheme
from moeconvert.quant.targets import Rule
from moeconvert.source import read_config
from moeconvert.tiny import auto_class, build_tiny_model

W4 = Scheme(bits=4, group_size=32)
# tensors besides the experts that a quantized output stores as released, per family
KEPT = {
    "granitemoe_swa": ("model.layers.0.block_sparse_moe.router.weight", "model.layers.2.self_attn.sinks"),
    "gemma4": (
        "model.language_model.layers.0.router.proj.weight",
        "model.language_model.layers.1.router.per_expert_scale",
        "model.vision_tower.patch_embedder.input_proj.weight",
    ),
    "llama4": (
        "language_model.model.layers.1.feed_forward.router.weight",
        "language_model.lm_head.weight",
        "vision_model.vision_adapter.mlp.fc1.weight",
        "multi_modal_projector.linear_1.weight",
    ),
}


def _moe_layers(folder: Path) -> list[int]:
    raw = read_config(folder)
    config = load_config(raw)
    return [i for i in range(config.num_hidden_layers) if family_for(raw).is_moe_layer(config, i)]


def _as_held(stack: torch.Tensor, folder: Path) -> torch.Tensor:
    """A released expert stack as every command holds it, [E, 2I, H] or [E, H, I] (Llama 4's releases
    store the transpose)."""
    return stack.transpose(-2, -1) if family_for(read_config(folder)).runtime_transposed else stack


def _experts_stem(folder: Path, layer: int) -> str:
    """The checkpoint's prefix of layer ``layer``'s experts (``model.layers.1.block_sparse_moe.``, or
    ``model.language_model.layers.1.`` where the experts hang off the layer)."""
    name = next(
        n for n in load_tensors(folder) if f"layers.{layer}." in n and n.endswith("experts.down_proj")
    )
    return name.removesuffix("experts.down_proj")


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> a tiny model as its releases store it (briefly trained, so that outputs are peaked)."""
    root = tmp_path_factory.mktemp("runtime_releases")
    return {
        family: build_tiny_model(family, root / family, seed=7, max_shard_size="300KB", train_steps=100)
        for family in RUNTIME_RELEASES
    }


@pytest.mark.parametrize("family", RUNTIME_RELEASES)
def test_streamed_forward_equals_model(family: str, released: dict[str, Path]) -> None:
    """Layer by layer, with a rotary embedding per distinct base (none where the base is 0), the
    streamed model gives the whole model's logits exactly."""
    streamed, tokens, hidden, layers = _layerwise(released[family], seed=5)
    for index, local in enumerate(layers):
        with streamed.layer(index, local) as layer:
            hidden = streamed.run_layer(layer, hidden)
    with torch.no_grad():
        whole = load_model(released[family], experts_implementation(streamed.device))
        assert torch.equal(whole(tokens).logits, streamed.logits(hidden))


@pytest.mark.parametrize("family", RUNTIME_RELEASES)
def test_a_layer_finished_from_its_residual_stream_is_the_layer(
    family: str, released: dict[str, Path]
) -> None:
    """As ``test_forward``'s test of the same name: Llama 4's layers add attention and MLP to the residual
    stream one after the other (its MoE block returns the router's logits beside its output, flattened
    to tokens), so a pass can finish one from its residual stream, bit for bit; Granite SWA's scale
    their parts and Gemma 4's norm them after their blocks, so those run whole."""
    assert_layers_finish_from_residual(released[family], halves=family == "llama4")


@pytest.mark.parametrize("family", RUNTIME_RELEASES)
def test_the_release_is_fused_and_unfuse_round_trips_bit_for_bit(
    family: str, released: dict[str, Path], tmp_path: Path
) -> None:
    source = released[family]
    assert inspect_model(str(source)).layout == "fused"
    with pytest.raises(
        UnsupportedModelError, match=f"already fused .{family} releases are in the runtime layout"
    ):
        fuse(str(source), tmp_path / "fused")
    unfuse(str(source), tmp_path / "unfused")
    per_expert = load_tensors(tmp_path / "unfused")
    stem, (gate_name, up_name, down_name) = (
        _experts_stem(source, 1),
        family_for(read_config(source)).projections,
    )
    released_tensors = load_tensors(source)
    gate, up = _as_held(released_tensors[stem + "experts.gate_up_proj"][3], source).chunk(2)
    assert torch.equal(per_expert[f"{stem}experts.3.{gate_name}.weight"], gate)
    assert torch.equal(per_expert[f"{stem}experts.3.{up_name}.weight"], up)
    assert torch.equal(
        per_expert[f"{stem}experts.3.{down_name}.weight"],
        _as_held(released_tensors[stem + "experts.down_proj"][3], source),
    )
    fuse(str(tmp_path / "unfused"), tmp_path / "again")
    again = load_tensors(tmp_path / "again")
    assert again.keys() == released_tensors.keys()
    assert all(torch.equal(again[n], t) for n, t in released_tensors.items())
    report = verify(str(source), str(tmp_path / "unfused"), samples=2, seq_len=64, progress=False)
    assert report.passed and report.kl_mean == 0


@pytest.mark.parametrize("family", RUNTIME_RELEASES)
def test_quantized_experts_are_stored_per_expert_under_vllms_names(
    family: str, released: dict[str, Path], tmp_path: Path
) -> None:
    """vLLM's loader splits the released stacks into per-expert names (Granite 3.x's w1/w3/w2, Gemma 4's
    and Llama 4's gate_proj/up_proj/down_proj), under which it reads quantized experts too; the router,
    the attention sinks and the vision encoder stay as released. transformers reads Granite's and Gemma
    4's experts only stacked: the card offers vLLM alone; Llama 4's it reads per expert too, and its
    logits are our decoding's. Decoded, an output with only the experts quantized is the original model
    to within 4-bit error, closer on the typical token than round-to-nearest, and far from one with the
    two busiest experts of a layer swapped (Gemma 4's attention and dense MLP take 4-bit rounding harder
    than its experts do, docs/PARITY.md, so they are kept out of this comparison)."""
    source = released[family]
    quantize(
        str(source), W4, output=tmp_path / "q", options=QuantizeOptions(samples=16, seq_len=128), verify=False
    )
    stored = load_tensors(tmp_path / "q")
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in stored)
    experts = {n.rpartition(".weight_")[0] for n in stored if ".experts." in n}
    assert experts == {
        f"{_experts_stem(source, i)}experts.{e}.{p}"
        for i in _moe_layers(source)
        for e in range(8)
        for p in family_for(read_config(source)).projections
    }
    original = load_tensors(source)
    for kept in KEPT[family]:
        assert torch.equal(stored[kept].float(), original[kept].float()), kept
    config = read_config(tmp_path / "q")
    loaded, info = auto_class(family).from_pretrained(tmp_path / "q", output_loading_info=True)
    report = json.loads((tmp_path / "q" / "quantization_report.json").read_text())
    router = family_for(config).router
    assert not [k for k in report["kept_modules"] if k.endswith(router)]  # routers, not kept by rules
    ignored = config["quantization_config"]["ignore"]
    assert any(n.endswith(f"layers.1.{router}") for n in ignored), ignored
    card = build_card(report, config, None, "me/swa-w4").text
    assert "vllm serve me/swa-w4" in card
    if family_for(config).transformers_reads_per_expert:  # Llama 4's: one module per expert on loading
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        ours = load_model(source)
        ours.load_state_dict(dequantized_state(tmp_path / "q", source), strict=True)
        with torch.no_grad():
            logits = loaded.eval()(eval_tokens()).logits
            assert torch.allclose(logits, ours(eval_tokens()).logits, atol=1e-5, rtol=0)
        assert "from_pretrained" in card
    else:
        assert {n for n in info["missing_keys"] if ".experts." in n}
        assert "from_pretrained" not in card

    quantize(
        str(source),
        W4,
        output=tmp_path / "experts",
        rules=(Rule(r"^(?!.*\.experts\b)", None),),  # everything but the experts kept
        options=QuantizeOptions(samples=16, seq_len=128),
        verify=False,
    )
    tokens = eval_tokens()
    reference = load_model(source)
    decoded = load_model(source)
    decoded.load_state_dict(dequantized_state(tmp_path / "experts", source), strict=True)
    swapped = load_model(source)
    experts_module = swapped.get_submodule(_experts_stem(source, 1) + "experts")
    picks = torch.zeros(experts_module.gate_up_proj.shape[0])

    def count(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        picks.add_(index.flatten().bincount(minlength=len(picks)))

    def count_scores(_: torch.nn.Module, args: tuple, output: tuple) -> None:  # Llama 4's router
        picks.add_((output[0] > 0).sum(dim=0))

    if family_for(read_config(source)).scales_expert_inputs:
        router = swapped.get_submodule(_experts_stem(source, 1) + "router")
        hook = router.register_forward_hook(count_scores)
    else:
        hook = experts_module.register_forward_pre_hook(count, with_kwargs=True)
    with torch.no_grad():
        swapped(tokens)
        hook.remove()
        busiest = picks.argsort(descending=True)[:2].tolist()
        for stack in (experts_module.gate_up_proj, experts_module.down_proj):
            stack.data[busiest] = stack.data[busiest[::-1]].clone()
    assert mean_kl(reference, decoded, tokens) < 0.2 * mean_kl(reference, swapped, tokens)

    quantize(
        str(source),
        Scheme(bits=4, group_size=32, method="rtn"),
        output=tmp_path / "experts_rtn",
        rules=(Rule(r"^(?!.*\.experts\b)", None),),
        options=QuantizeOptions(samples=16, seq_len=128),
        verify=False,
    )
    rounded = load_model(source)
    rounded.load_state_dict(dequantized_state(tmp_path / "experts_rtn", source), strict=True)
    # the typical token: GPTQ, calibrated on each expert's own tokens, moves it less than rounding does
    assert token_kl(reference, decoded, tokens).median() < token_kl(reference, rounded, tokens).median()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"enable_moe_block": False}, "enable_moe_block is false: a dense model"),
        ({"hidden_size_per_layer_input": 16}, "per-layer embeddings are not supported"),
        ({"num_kv_shared_layers": 1}, "reuse other layers' keys and values are not supported"),
    ],
)
def test_gemma4_models_a_layer_at_a_time_cannot_run_are_refused(
    change: dict, fragment: str, released: dict[str, Path], tmp_path: Path
) -> None:
    """A dense Gemma 4 has no experts; the small ones' per-layer embeddings and shared keys and values
    are not held by a pass over one layer at a time: each is refused in one line, before any work."""
    folder = tmp_path / "model"
    shutil.copytree(released["gemma4"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(change)
    (folder / "config.json").write_text(json.dumps(config))
    for command in ("inspect", "quantize"):
        out = () if command == "inspect" else ("-o", str(tmp_path / "out"))
        assert_clean_failure(invoke_cli(command, str(folder), *out), tmp_path / "out", fragment)


def test_llama4_experts_are_calibrated_on_their_tokens_scaled_by_their_scores(
    released: dict[str, Path],
) -> None:
    """Llama 4's router scales each token into its expert, so an expert's GPTQ statistics are sums over
    its tokens times their scores: those transformers' experts module itself receives (rows of zeros
    for the experts a token was not routed to), and for the down projection their activations. Sums of
    the unscaled tokens are far from these: statistics that ignored the scores would fail here."""
    from moeconvert.pipeline import Quantizer
    from moeconvert.quant.calibration import calibration_tokens
    from moeconvert.quant.targets import TargetPolicy

    source, layer = released["llama4"], 1
    options = QuantizeOptions(samples=8, seq_len=64)
    runner = Quantizer(str(source), TargetPolicy(W4), options, None, None)
    plan, _ = runner.plan()
    runner.streamed.load_top(runner.reader.get_many(dict(runner.groups)[None]))
    hidden, _ = runner.calibration_batches()
    for index in range(layer + 1):
        local, _ = runner._local(index, runner.reader.get_many(dict(runner.groups)[index]))
        if index == layer:
            stats, _ = runner._calibrate_layer(layer, local, plan[layer], hidden, keep_residual=False)
            break
        with runner.streamed.layer(index, local) as module:
            hidden = [runner.streamed.run_layer(module, h) for h in hidden]
    runner.close()

    model = load_model(source)
    block = model.get_submodule(_experts_stem(source, layer).removesuffix("."))
    seen: dict[str, list[torch.Tensor]] = {"rows": [], "tokens": []}
    hooks = [
        block.experts.register_forward_pre_hook(lambda m, args: seen["rows"].append(args[0])),
        block.router.register_forward_pre_hook(lambda m, args: seen["tokens"].append(args[0])),
    ]
    tokens = calibration_tokens(None, None, 256, options.samples, options.seq_len, options.seed)
    with torch.no_grad():
        for batch in tokens.split(max(1, options.batch_tokens // options.seq_len)):
            model(batch)
    for hook in hooks:
        hook.remove()
    count = block.experts.gate_up_proj.shape[0]
    rows = torch.cat([r.view(count, -1, r.shape[-1]) for r in seen["rows"]], dim=1)  # [E, T, H]
    unscaled = torch.cat(seen["tokens"])
    gate_up = stats.accumulators[
        _experts_stem(source, layer).partition("layers.1.")[2] + "experts.gate_up_proj"
    ]
    down = stats.accumulators[_experts_stem(source, layer).partition("layers.1.")[2] + "experts.down_proj"]
    sums_gate_up, sums_down = gate_up.sums(), down.sums()
    fed = 0
    for expert in range(count):
        routed = rows[expert].abs().sum(dim=1) > 0
        mine = rows[expert][routed]
        assert gate_up.counts[expert] == mine.shape[0]
        if not routed.any():
            continue
        fed += 1
        assert torch.allclose(sums_gate_up[expert], mine.T @ mine, rtol=1e-4, atol=1e-4)
        alone = unscaled[routed]
        assert not torch.allclose(sums_gate_up[expert], alone.T @ alone, rtol=0.05, atol=1e-3)
        gate, up = (mine @ block.experts.gate_up_proj[expert].detach()).chunk(2, dim=-1)
        activations = block.experts.act_fn(gate) * up
        assert torch.allclose(sums_down[expert], activations.T @ activations, rtol=1e-4, atol=1e-4)
    assert fed >= 2


def test_llama4_stacks_in_a_layer_config_json_makes_dense_are_refused(
    released: dict[str, Path], tmp_path: Path
) -> None:
    """config.json lists Llama 4's MoE layers (``moe_layers``); experts stacked in a layer it leaves out
    would not fit transformers' model of that layer: refused in one line, before any work."""
    folder = tmp_path / "model"
    shutil.copytree(released["llama4"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["moe_layers"] = [3]
    (folder / "config.json").write_text(json.dumps(config))
    fragment = "layer 1 holds experts but config.json makes it a dense layer"
    for command in ("inspect", "quantize"):
        out = (
            ()
            if command == "inspect"
            else ("-o", str(tmp_path / "out"), "--seq-len", "64", "--group-size", "32")
        )
        assert_clean_failure(invoke_cli(command, str(folder), *out), tmp_path / "out", fragment)
