"""Mixed-scheme outputs: the config's rules give every module the bits stored for it, under the names its
loaders use.

transformers and GPTQModel look modules up under the checkpoint's names. vLLM looks them up under its own:
q/k/v as ``qkv_proj``, gate/up as ``gate_up_proj``, DeepSeek's q_a/kv_a as ``fused_qkv_a_proj`` (its
``packed_modules_mapping``), a layer's experts as one module: its compressed-tensors path asks for
``experts.0.gate_proj``/``up_proj``/``down_proj`` whatever the checkpoint calls them, its GPTQ path for
``experts`` itself; ``ignore`` is checked first, GPTQ ``dynamic`` rules in file order, the first match
deciding. The recipe here singles out one layer, which a rule generalized to every layer would get wrong.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import dequantized_state, eval_tokens, load_model, load_tensors, with_mtp

from moeconvert.errors import BadInputError
from moeconvert.pipeline import QuantizeOptions, quantize
from moeconvert.quant.packing import unpack_compressed
from moeconvert.quant.scheme import Scheme
from moeconvert.quant.targets import Rule

W4, W8 = Scheme(bits=4, group_size=32, method="rtn"), Scheme(bits=8, group_size=32, method="rtn")
RULES = (Rule(r"layers\.0\.self_attn", W8), Rule(r"layers\.1\.self_attn", None))  # layer 0 w8, layer 1 kept
VLLM_FUSED = {  # vLLM's packed_modules_mapping: its module -> the checkpoint's
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"),
    "in_proj_qkvz": ("in_proj_qkv", "in_proj_z"),  # Qwen3.5's linear attention
    "in_proj_ba": ("in_proj_b", "in_proj_a"),
}
VLLM_PREFIXES = {"model.language_model.": "language_model.model.", "model.visual.": "visual."}  # Qwen3.5
VLLM_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
FAMILIES = ("mixtral", "qwen2_moe", "deepseek_v3", "glm4_moe")


def stored_bits(tensors: dict[str, torch.Tensor]) -> dict[str, int | None]:
    """Checkpoint Linear module -> bits of its stored codes (None: kept in full precision)."""
    bits: dict[str, int | None] = {}
    for name, tensor in tensors.items():
        module, _, kind = name.rpartition(".")
        if kind == "weight_packed":  # [out, in*bits/32]
            bits[module] = tensor.shape[1] * 32 // int(tensors[module + ".weight_shape"][1])
        elif kind == "qweight":  # [in*bits/32, out]
            bits[module] = tensor.shape[0] * 32 // tensors[module + ".g_idx"].numel()
        elif kind == "weight" and tensor.dim() == 2 and "embed" not in module and "norm" not in module:
            bits.setdefault(module, None)
    return bits


def _matches(target: str, name: str) -> bool:
    if target == "Linear":  # a class: every module asked about here is a Linear (or vLLM's FusedMoE)
        return True
    return bool(re.match(target[3:], name)) if target.startswith("re:") else target == name


def compressed_tensors_bits(quant: dict, name: str, shards: tuple[str, ...] = ()) -> int | None:
    """What a compressed-tensors loader gives module ``name`` (``shards``: the names it fuses)."""
    if any(_matches(t, n) for t in quant["ignore"] for n in (shards or (name,))):
        return None
    found = {
        group["weights"]["num_bits"]
        for group in quant["config_groups"].values()
        if any(_matches(t, name) for t in group["targets"])
    }
    assert len(found) == 1, f"{name}: groups with bits {found} claim it"
    return found.pop()


def gptq_bits(quant: dict, name: str) -> int | None:
    for pattern, override in quant.get("dynamic", {}).items():
        if re.match(pattern[2:], name):
            return None if pattern.startswith("-:") else override.get("bits", quant["bits"])
    return quant["bits"]


def loader_bits(quant: dict, name: str, shards: tuple[str, ...] = ()) -> int | None:
    if quant["quant_method"] == "gptq":
        return gptq_bits(quant, name)
    return compressed_tensors_bits(quant, name, shards)


def vllm_views(bits: dict[str, int | None], gptq: bool) -> dict[str, tuple[str, list[str]]]:
    """vLLM module -> (the name it looks the scheme up under, the checkpoint modules it holds)."""
    views: dict[str, tuple[str, list[str]]] = {}
    for module in bits:
        prefix, _, leaf = module.rpartition(".")
        expert = re.match(r"(.*\.experts)\.\d+\.\w+$", module)
        if expert:
            layer_module = expert.group(1)
            lookups = [layer_module] if gptq else [f"{layer_module}.0.{n}" for n in VLLM_EXPERT_NAMES]
            for lookup in lookups:
                views.setdefault(lookup, (lookup, []))[1].append(module)
            continue
        fused = next((f for f, parts in VLLM_FUSED.items() if leaf in parts), None)
        name = f"{prefix}.{fused}" if fused else module
        views.setdefault(name, (name, []))[1].append(module)
    return views


def quantized_config(source: Path, output: Path, fmt: str, rules: tuple[Rule, ...] = ()) -> dict:
    """Quantize ``source`` (RTN 4-bit g32, a few calibration tokens) into ``output``; its quantization_config."""
    options = QuantizeOptions(samples=4, seq_len=32, format=fmt)
    quantize(str(source), W4, output=output, rules=rules, options=options, force=True, verify=False)
    return json.loads((output / "config.json").read_text())["quantization_config"]


@pytest.fixture(scope="module")
def mixed_outputs(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("mixed")
    out = {}
    for family in FAMILIES:
        for fmt in ("compressed-tensors", "gptq"):
            out[family, fmt] = root / f"{family}-{fmt}"
            quantized_config(tiny_models[family], out[family, fmt], fmt, RULES)
    return out


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_loader_name_gets_the_stored_bits(family: str, fmt: str, mixed_outputs: dict) -> None:
    folder = mixed_outputs[family, fmt]
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    bits = stored_bits(load_tensors(folder))
    attention = {m: b for m, b in bits.items() if ".self_attn." in m}
    assert {b for m, b in attention.items() if ".layers.0." in m} == {8}
    assert {b for m, b in attention.items() if ".layers.1." in m} == {None}
    assert {b for m, b in attention.items() if ".layers.2." in m} == {4}

    assert_every_loader_gets_the_stored_bits(quant, bits)


def assert_every_loader_gets_the_stored_bits(quant: dict, bits: dict[str, int | None]) -> None:
    for module, stored in bits.items():  # transformers' and GPTQModel's view
        if module != "lm_head":
            assert loader_bits(quant, module) == stored, module
    renamed = vllm_renamed(quant)
    for lookup, held in vllm_views(bits, gptq=quant["quant_method"] == "gptq").values():  # vLLM's
        (stored,) = {bits[m] for m in held}
        shards = tuple(map(vllm_name, held)) if len(held) > 1 and ".experts" not in lookup else ()
        assert loader_bits(renamed, vllm_name(lookup), shards) == stored, lookup


def vllm_name(name: str) -> str:
    """vLLM's name of a vision-language checkpoint's module (others keep theirs)."""
    prefix = next((p for p in VLLM_PREFIXES if name.startswith(p)), None)
    return name if prefix is None else VLLM_PREFIXES[prefix] + name[len(prefix) :]


def vllm_renamed(quant: dict) -> dict:
    """The config as vLLM reads it: module names in compressed-tensors ``ignore`` renamed as it renames
    the checkpoint's modules, regexes (``re:``, GPTQ's ``dynamic``) as written."""
    if "ignore" not in quant:
        return quant
    ignore = [t if t.startswith("re:") else vllm_name(t) for t in quant["ignore"]]
    return {**quant, "ignore": ignore}


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_computes_with_the_bits_we_stored(
    family: str, mixed_outputs: dict, tiny_models: dict[str, Path]
) -> None:
    """transformers + compressed-tensors picks each module's group from the config; the logits equal a
    forward with our decoding of the files, which reads the bits off the stored shapes."""
    folder = mixed_outputs[family, "compressed-tensors"]
    ours = load_model(tiny_models[family])
    ours.load_state_dict(dequantized_state(folder, tiny_models[family]), strict=True)
    tokens = eval_tokens(batch=2, seq_len=32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(folder)(tokens).logits, ours(tokens).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
@pytest.mark.parametrize(
    ("family", "attention"),
    [
        ("deepseek_v3", "self_attn.fused_qkv_a_proj"),
        ("glm4_moe", "self_attn.qkv_proj"),
        ("glm4v_moe", "self_attn.qkv_proj"),
        ("qwen3_next", "fc"),
        ("ernie4_5_moe", "block.0.self_attn.qkv_proj"),
    ],
)
def test_an_mtp_layer_carried_in_full_precision_is_not_taken_for_quantized(
    fmt: str, family: str, attention: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """DeepSeek-V3's and GLM's MTP layers follow the decoder layers; Qwen3-Next's MTP block is ``mtp.*``,
    ERNIE-4.5's ``model.mtp_*``."""
    source, block, top = with_mtp(family, tiny_models[family], tmp_path / "source")
    out = tmp_path / "out"
    quant = quantized_config(source, out, fmt)
    stored = load_tensors(out)
    assert all(torch.equal(stored[n], t) for n, t in load_tensors(source).items() if n.startswith(top))
    bits = stored_bits(stored)
    carried = [m for m in bits if m.startswith(top)]
    assert carried and {bits[m] for m in carried} == {None}
    for module in [*carried, top + attention, block + "mlp.experts"]:
        assert loader_bits(quant, module) is None, module
    o_proj = next(m for m in bits if m.endswith("layers.1.self_attn.o_proj"))
    assert loader_bits(quant, o_proj) == 4  # the layers before it stay quantized


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_a_vision_language_checkpoint_gets_the_stored_bits_under_vllm_names_too(
    fmt: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Qwen3.5: vLLM calls ``model.language_model.*`` ``language_model.model.*`` and ``model.visual.*``
    ``visual.*``, transformers' causal LM of the text model alone calls it ``model.*``; the vision
    encoder and the linear attention stay in full precision for every loader."""
    rules = (Rule(r"layers\.1\.self_attn", W8), Rule(r"layers\.2\.mlp\.shared_expert\.", None))
    quant = quantized_config(tiny_models["qwen3_5_moe"], tmp_path, fmt, rules)
    bits = stored_bits(load_tensors(tmp_path))
    text = "model.language_model.layers."
    assert bits[text + "1.self_attn.q_proj"] == 8 and bits[text + "0.mlp.shared_expert.up_proj"] == 4
    assert bits[text + "2.mlp.shared_expert.up_proj"] is None
    assert {bits[m] for m in bits if ".linear_attn." in m} == {None}
    assert {bits[m] for m in bits if m.startswith("model.visual.")} == {None}
    assert_every_loader_gets_the_stored_bits(quant, bits)
    for module, stored in bits.items():  # transformers' causal LM of the text model alone
        if module.startswith(text):
            assert loader_bits(quant, module.replace("model.language_model.", "model.", 1)) == stored, module


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_qwen3_vl_moe_stacks_as_released_quantize_per_expert_under_every_loaders_names(
    fmt: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Qwen3-VL-MoE releases stack each layer's experts transposed; the output stores them per expert,
    the names vLLM reads, each expert of a layer singled out by a rule at that layer's bits."""
    rules = (Rule(r"layers\.1\.mlp\.experts\.", W8), Rule(r"layers\.2\.self_attn", None))
    quant = quantized_config(tiny_models["qwen3_vl_moe"], tmp_path, fmt, rules)
    stored = load_tensors(tmp_path)
    assert not any(n.endswith(("gate_up_proj", "down_proj")) for n in stored)  # no stack left
    bits = stored_bits(stored)
    text = "model.language_model.layers."
    for e in range(8):
        for projection in ("gate_proj", "up_proj", "down_proj"):
            assert bits[f"{text}0.mlp.experts.{e}.{projection}"] == 4
            assert bits[f"{text}1.mlp.experts.{e}.{projection}"] == 8
    assert bits[text + "2.self_attn.q_proj"] is None and bits[text + "1.self_attn.q_proj"] == 4
    assert {bits[m] for m in bits if m.startswith("model.visual.")} == {None}
    assert_every_loader_gets_the_stored_bits(quant, bits)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_granite_stacks_as_released_quantize_per_expert_under_vllms_names_and_mamba_stays(
    fmt: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Granite 4.0-H releases stack each layer's experts under names of their own; the output stores
    them per expert, as vLLM's Granite loader reads quantized experts, and none of the released stacks
    is left beside them. The Mamba mixers stay in full precision unless a rule names them."""
    rules = (Rule(r"layers\.1\.block_sparse_moe\.experts\.", W8), Rule(r"layers\.2\.mamba\.out_proj", W8))
    quant = quantized_config(tiny_models["granitemoehybrid"], tmp_path, fmt, rules)
    stored = load_tensors(tmp_path)
    stacks = ("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight")
    assert not any(n.endswith(stacks) for n in stored)
    bits = stored_bits(stored)
    for e in range(8):
        for projection in ("gate_proj", "up_proj", "down_proj"):
            assert bits[f"model.layers.0.block_sparse_moe.experts.{e}.{projection}"] == 4
            assert bits[f"model.layers.1.block_sparse_moe.experts.{e}.{projection}"] == 8
    assert (
        bits["model.layers.0.shared_mlp.input_linear"] == 4 and bits["model.layers.1.self_attn.q_proj"] == 4
    )
    assert bits["model.layers.0.mamba.in_proj"] is None and bits["model.layers.2.mamba.in_proj"] is None
    assert bits["model.layers.2.mamba.out_proj"] == 8 and bits["model.layers.0.mamba.out_proj"] is None
    assert stored["model.layers.0.block_sparse_moe.router.layer.weight"].dtype == torch.float32
    assert_every_loader_gets_the_stored_bits(quant, bits)


@pytest.mark.parametrize(
    ("family", "fmt"), [("granitemoe", "gptq"), ("granitemoeshared", "compressed-tensors")]
)
def test_granite_3_experts_quantize_per_expert_under_mixtral_style_names(
    family: str, fmt: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Granite 3.x releases stack experts as Granite 4.0-H's do, but vLLM's loader for them reads
    quantized experts under Mixtral's per-expert names, w1/w3/w2 (gate, up, down), and renames the
    released router itself: the output stores them so, with no stack left and the router kept."""
    rules = (Rule(r"layers\.1\.block_sparse_moe\.experts\.", W8),)
    quant = quantized_config(tiny_models[family], tmp_path, fmt, rules)
    stored = load_tensors(tmp_path)
    assert not any(
        n.endswith(("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight"))
        for n in stored
    )
    bits = stored_bits(stored)
    experts = {m for m in bits if ".experts." in m}
    assert experts == {
        f"model.layers.{i}.block_sparse_moe.experts.{e}.{p}"
        for i in range(3)
        for e in range(8)
        for p in ("w1", "w3", "w2")
    }
    assert {bits[m] for m in experts if ".layers.1." in m} == {8}
    assert {bits[m] for m in experts if ".layers.1." not in m} == {4}
    assert bits["model.layers.0.block_sparse_moe.router.layer"] is None
    assert (family == "granitemoeshared") == ("model.layers.0.shared_mlp.input_linear" in bits)
    assert bits.get("model.layers.0.shared_mlp.input_linear", 4) == 4
    assert_every_loader_gets_the_stored_bits(quant, bits)
    if fmt == "compressed-tensors":  # each name holds its own projection, decoded back from the file
        released = load_tensors(tiny_models[family])
        stem = "model.layers.2.block_sparse_moe."
        gate, up = released[stem + "input_linear.weight"][5].float().chunk(2)
        down = released[stem + "output_linear.weight"][5].float()
        for name, expected, other in (("w1", gate, up), ("w3", up, gate), ("w2", down, down.flip(0))):
            module = f"{stem}experts.5.{name}"
            parts = {k[len(module) + 1 :]: v for k, v in stored.items() if k.startswith(module + ".weight_")}
            decoded = unpack_compressed(parts, 4, sym="weight_zero_point" not in parts).dequantize().float()
            assert (decoded - expected).norm() < 0.2 * (decoded - other).norm(), name


def test_jamba_mamba_stays_in_full_precision_unless_a_rule_names_it(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Jamba's Mamba mixers are kept by default; its experts (feed_forward, every other layer), dense MLPs
    and attention are quantized, its routers kept; a rule quantizes a Mamba projection."""
    quant = quantized_config(
        tiny_models["jamba"], tmp_path, "compressed-tensors", (Rule(r"layers\.0\.mamba\.out_proj", W8),)
    )
    bits = stored_bits(load_tensors(tmp_path))
    mamba = [m for m in bits if ".mamba." in m and not m.startswith("model.layers.0.mamba.out_proj")]
    assert len(mamba) == 3 * 4 - 1 and {bits[m] for m in mamba} == {None}
    assert bits["model.layers.0.mamba.out_proj"] == 8
    assert bits["model.layers.1.feed_forward.experts.7.down_proj"] == 4
    assert bits["model.layers.0.feed_forward.gate_proj"] == 4 and bits["model.layers.2.self_attn.q_proj"] == 4
    assert bits["model.layers.1.feed_forward.router"] is None
    assert_every_loader_gets_the_stored_bits(quant, bits)


def test_the_deepseek_v32_indexer_stays_in_full_precision_and_engines_get_what_they_build(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """DeepSeek-V3.2's indexer (wq_b, wk, weights_proj) is kept by default. A rule may quantize wq_b and
    wk, which engines build quantizable, but not weights_proj, which they build without quantization:
    that rule is refused before anything is written."""
    source = tiny_models["deepseek_v32"]
    quant = quantized_config(source, tmp_path / "default", "compressed-tensors")
    bits = stored_bits(load_tensors(tmp_path / "default"))
    indexer = [m for m in bits if ".self_attn.indexer." in m]
    assert len(indexer) == 3 * 3 and {bits[m] for m in indexer} == {None}
    assert bits["model.layers.1.self_attn.q_b_proj"] == 4
    assert_every_loader_gets_the_stored_bits(quant, bits)
    with pytest.raises(BadInputError, match=r"layers\.0\.self_attn\.indexer\.weights_proj: vLLM"):
        quantized_config(source, tmp_path / "broad", "compressed-tensors", (Rule("self_attn", W8),))
    assert not (tmp_path / "broad").exists()
    rules = (Rule(r"indexer\.weights_proj", None), Rule("self_attn", W8))
    quant = quantized_config(source, tmp_path / "narrow", "gptq", rules)
    bits = stored_bits(load_tensors(tmp_path / "narrow"))
    assert (
        bits["model.layers.2.self_attn.indexer.wk"] == 8
        and bits["model.layers.2.self_attn.indexer.weights_proj"] is None
    )
    assert_every_loader_gets_the_stored_bits(quant, bits)


def test_lfm2_convolutions_stay_in_full_precision_as_vllm_builds_them(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """LFM2-MoE's short convolutions (in_proj, out_proj) are kept by default and listed as kept; vLLM
    builds them without quantization, so a rule that quantizes them is refused before anything is
    written. Its attention and experts, under the feed_forward block, are quantized."""
    source = tiny_models["lfm2_moe"]
    quant = quantized_config(source, tmp_path / "default", "compressed-tensors")
    bits = stored_bits(load_tensors(tmp_path / "default"))
    conv = [m for m in bits if ".conv." in m]
    assert len(conv) == 2 * 2 and {bits[m] for m in conv} == {None}
    assert (
        bits["model.layers.1.self_attn.q_proj"] == 4 and bits["model.layers.2.feed_forward.experts.0.w2"] == 4
    )
    assert bits["model.layers.1.feed_forward.gate"] is None
    assert_every_loader_gets_the_stored_bits(quant, bits)
    with pytest.raises(BadInputError, match=r"layers\.0\.conv\.in_proj: vLLM load"):
        quantized_config(source, tmp_path / "broad", "compressed-tensors", (Rule(r"\.conv\.", W8),))
    assert not (tmp_path / "broad").exists()


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_schemes_stored_alike_share_one_rule(fmt: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Attention solved by GPTQ, experts by RTN, both 4-bit g32: one stored form, so no mixed rules."""
    rules = (Rule("self_attn", Scheme(bits=4, group_size=32, method="gptq")),)
    quant = quantized_config(tiny_models["mixtral"], tmp_path, fmt, rules)
    if fmt == "gptq":
        assert not any(rule.startswith("+:") for rule in quant["dynamic"])
    else:
        assert [group["targets"] for group in quant["config_groups"].values()] == [["Linear"]]


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_experts_kept_in_full_precision_are_unquantized_for_vllm(
    fmt: str, tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """vLLM loads kept experts as such. transformers 5 cannot load them from compressed-tensors (it
    dequantizes experts as it stacks them, and finds nothing packed to stack): the run says so."""
    rules = (Rule(r"layers\.1\.block_sparse_moe\.experts", None),)  # Mixtral's w1/w2/w3, layer 1
    quant = quantized_config(tiny_models["mixtral"], tmp_path, fmt, rules)
    noted = (
        "note: experts kept in full precision: vLLM loads this compressed-tensors output"
        in capsys.readouterr().err
    )
    assert noted == (fmt == "compressed-tensors")
    quantized_config(tiny_models["mixtral"], tmp_path / "all", fmt)
    assert "note: experts kept" not in capsys.readouterr().err
    bits = stored_bits(load_tensors(tmp_path))
    for lookup, held in vllm_views(bits, gptq=fmt == "gptq").values():
        if ".experts" in lookup:
            (stored,) = {bits[m] for m in held}
            assert stored == (None if ".layers.1." in lookup else 4), lookup
            assert loader_bits(quant, lookup) == stored, lookup


@pytest.mark.parametrize(
    ("family", "split", "message", "whole"),
    [
        ("mixtral", r"q_proj", "self_attn: k_proj, q_proj, v_proj get different schemes", r"self_attn"),
        ("qwen2_moe", r"shared_expert\.up_proj", "shared_expert: gate_proj, up_proj get", r"shared_expert\."),
        ("mixtral", r"layers\.1\..*experts\.\d+\.w2", "layers.1.block_sparse_moe.experts: the projections get", r"layers\.1\..*experts"),
        ("qwen3_5_moe", r"in_proj_b", "linear_attn: in_proj_a, in_proj_b get different schemes", r"in_proj_[ab]"),
    ],
)  # fmt: skip
def test_a_recipe_that_splits_a_module_vllm_fuses_is_refused(
    family: str, split: str, message: str, whole: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """vLLM loads q/k/v, gate/up, Qwen3.5's in_proj_b/a (and in_proj_qkv/z) and a layer's experts as one
    module with one scheme: it refuses a checkpoint that splits them, or reads every part with one part's
    bits. Refused before any work; the same rule over the whole module is fine."""
    from moeconvert.errors import BadInputError

    model, output = str(tiny_models[family]), tmp_path / "out"
    with pytest.raises(BadInputError, match=re.escape(message) + ".* vLLM loads them as one"):
        quantize(model, W4, rules=(Rule(split, W8),), output=output, dry_run=True)
    report = quantize(model, W4, rules=(Rule(whole, W8),), output=output, dry_run=True)
    assert report.quantized_modules > 0 and not any(tmp_path.iterdir())


def test_three_schemes_load_in_transformers(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Experts at 4 bits in groups, attention at 8 bits in groups, the shared expert at 8 bits per
    channel: three config groups, each module decoded by transformers with its own."""
    source = tiny_models["qwen2_moe"]
    per_channel = Scheme(bits=8, group_size=-1, method="rtn")
    rules = (Rule("self_attn", W8), Rule(r"shared_expert\.", per_channel))
    quant = quantized_config(source, tmp_path / "out", "compressed-tensors", rules)
    strategies = sorted(
        (g["weights"]["num_bits"], g["weights"]["strategy"]) for g in quant["config_groups"].values()
    )
    assert strategies == [(4, "group"), (8, "channel"), (8, "group")], strategies
    ours = load_model(source)
    ours.load_state_dict(dequantized_state(tmp_path / "out", source), strict=True)
    tokens = eval_tokens(batch=2, seq_len=32)
    with torch.no_grad():
        theirs = load_model(tmp_path / "out")(tokens).logits
        torch.testing.assert_close(theirs, ours(tokens).logits, atol=1e-5, rtol=0)


def test_qwen3_next_keeps_its_linear_attention_unless_a_rule_names_it(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The family's default: linear-attention projections stay in full precision, listed as such for the
    loaders; a rule that names them quantizes them like any other module."""
    source = tiny_models["qwen3_next"]
    quant = quantized_config(source, tmp_path / "default", "compressed-tensors")
    bits = stored_bits(load_tensors(tmp_path / "default"))
    linear = [m for m in bits if ".linear_attn." in m]
    assert linear and {bits[m] for m in linear} == {None}
    assert all(loader_bits(quant, m) is None for m in linear)
    assert bits["model.layers.1.self_attn.q_proj"] == bits["model.layers.0.mlp.shared_expert.up_proj"] == 4

    quantized_config(source, tmp_path / "named", "compressed-tensors", (Rule(r"linear_attn\.in_proj", W8),))
    bits = stored_bits(load_tensors(tmp_path / "named"))
    assert {bits[m] for m in linear if ".in_proj_" in m} == {8} and {
        bits[m] for m in linear if "out_proj" in m
    } == {None}
