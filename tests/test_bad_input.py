"""Bad input: one line on stderr, exit code 2, no traceback, nothing at the output path.

The many breakages of one check run the command line in this process (``invoke_cli``); the tests of
whole commands (a missing folder, a bad shard size, pickles, remote code, help) run it as a user does,
in a fresh process (``run_cli``)."""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import invoke_cli, run_cli
from safetensors.torch import load_file, save_file


def _copy(tiny_models: dict[str, Path], tmp_path: Path, family: str = "mixtral") -> Path:
    return Path(shutil.copytree(tiny_models[family], tmp_path / "model"))


def _first_shard(folder: Path) -> Path:
    return sorted(folder.glob("*.safetensors"))[0]


def _corrupt_header(folder: Path) -> None:
    shard = _first_shard(folder)
    data = bytearray(shard.read_bytes())
    data[8:20] = b"{not json!!!"
    shard.write_bytes(bytes(data))


def _huge_header(folder: Path) -> None:
    shard = _first_shard(folder)
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    shard.write_bytes(bytes(data))


def _truncate(folder: Path) -> None:
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])


def _drop_shard(folder: Path) -> None:
    _first_shard(folder).unlink()


def _index_escapes(folder: Path) -> None:
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../outside.safetensors"
    index_path.write_text(json.dumps(index))


def _pickle_only(folder: Path) -> None:
    for path in folder.glob("*.safetensors*"):
        path.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not to be unpickled")


def _dense(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))


def _lying_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["num_local_experts"] = 6
    (folder / "config.json").write_text(json.dumps(config))


def _config_with(**values: object) -> Callable[[Path], None]:
    return lambda folder: _edit_config(folder, **values)


def _missing_expert(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = "model.layers.2.block_sparse_moe.experts.3.w2.weight"
    shard = folder / index["weight_map"][victim]
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    del index["weight_map"][victim]
    index_path.write_text(json.dumps(index))


def _shard_of(folder: Path, name: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][name]


def _edit_tensors(folder: Path, name: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite the shard holding ``name`` after ``edit`` has changed its tensors in place."""
    shard = _shard_of(folder, name)
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def _edit_header(shard: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite a shard's JSON header (the data bytes stay as they are)."""
    data = shard.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


EXPERT_W1 = "model.layers.2.block_sparse_moe.experts.3.w1.weight"


def _duplicate_across_shards(folder: Path) -> None:
    """A second shard (named in the index for its own tensors) also holds a tensor the index puts elsewhere."""
    victim = "model.layers.1.self_attn.q_proj.weight"
    tensor = load_file(_shard_of(folder, victim))[victim]
    other = next(s for s in sorted(folder.glob("*.safetensors")) if s != _shard_of(folder, victim))
    tensors = load_file(other)
    tensors[victim] = tensor
    save_file(tensors, other, metadata={"format": "pt"})


def _unknown_dtype(folder: Path) -> None:
    def edit(header: dict) -> None:
        header[EXPERT_W1]["dtype"] = "Q4_K"

    _edit_header(_shard_of(folder, EXPERT_W1), edit)


def _trailing_bytes(folder: Path) -> None:
    shard = _first_shard(folder)
    shard.write_bytes(shard.read_bytes() + b"\0" * 16)


def _wrong_expert_shape(folder: Path) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[EXPERT_W1] = tensors[EXPERT_W1][:80].clone()

    _edit_tensors(folder, EXPERT_W1, edit)


def _wrong_router_shape(folder: Path) -> None:
    router = "model.layers.1.block_sparse_moe.gate.weight"

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[router] = tensors[router][:, :48].clone()

    _edit_tensors(folder, router, edit)


def _wrong_attention_shape(folder: Path) -> None:
    name = "model.layers.0.self_attn.k_proj.weight"

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name][:16].clone()

    _edit_tensors(folder, name, edit)


def _nan_in_expert(folder: Path) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[EXPERT_W1][5, 7] = float("nan")

    _edit_tensors(folder, EXPERT_W1, edit)


def _expert_in_another_dtype(folder: Path) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[EXPERT_W1] = tensors[EXPERT_W1].half()

    _edit_tensors(folder, EXPERT_W1, edit)


def _inf_in_attention(folder: Path) -> None:
    name = "model.layers.1.self_attn.o_proj.weight"

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name][0, 3] = float("-inf")

    _edit_tensors(folder, name, edit)


BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "corrupt header": (_corrupt_header, "not valid JSON"),
    "header larger than file": (_huge_header, "larger than the file"),
    "truncated shard": (_truncate, "truncated"),
    "index names a missing file": (_drop_shard, "missing"),
    "index points outside the folder": (_index_escapes, "outside the model folder"),
    "pickle only": (_pickle_only, "pickle"),
    "dense model": (_dense, "supported: afmoe, axk1, beam, cohere2_moe, deepseek_v2"),
    "config lies about experts": (_lying_config, "says 6 experts"),
    "config value of the wrong type": (
        _config_with(num_local_experts="8"),
        "config.json of mixtral model is invalid: Validation error for field 'num_local_experts'",
    ),
    "config routes to more experts than it has": (
        _config_with(num_experts_per_tok=9),
        "num_experts_per_tok=9 with num_local_experts=8 (routing needs 1 <= top-k <= experts)",
    ),
    "config dtype unknown": (
        _config_with(torch_dtype="float99", dtype="float99"),
        "has no attribute 'float99'",
    ),
    "config undercounts the layers": (
        _config_with(num_hidden_layers=2),
        "config.json says 2 decoder layers, the checkpoint has layers 0..2",
    ),
    "config overcounts the layers": (_config_with(num_hidden_layers=5), "says 5 decoder layers"),
    "config of another family": (
        _config_with(model_type="qwen3_moe"),
        "transformers cannot build a qwen3_moe model from this config.json",
    ),
    "missing expert tensor": (_missing_expert, "expert 3 has no w2"),
    "duplicate tensor across shards": (_duplicate_across_shards, "appears in both"),
    "unknown dtype": (_unknown_dtype, "unsupported dtype 'Q4_K'"),
    "bytes after the last tensor": (_trailing_bytes, "follow the last tensor"),
    "expert shape contradicts config": (
        _wrong_expert_shape,
        f"{EXPERT_W1} has shape [80, 64], but config.json implies [96, 64]",
    ),
    "router shape contradicts config": (_wrong_router_shape, "gate.weight has shape [8, 48]"),
    "attention shape contradicts config": (
        _wrong_attention_shape,
        "model.layers.0.self_attn.k_proj.weight has shape [16, 64], but config.json implies [32, 64]",
    ),
    "config lies about intermediate size": (
        lambda folder: _edit_config(folder, intermediate_size=128),
        "implies [128, 64] (intermediate_size=128, hidden_size=64)",
    ),
    "config lies about hidden size": (
        lambda folder: _edit_config(folder, hidden_size=32),
        "lm_head.weight has shape [256, 64], but config.json implies [256, 32]",
    ),
    "experts in two dtypes": (_expert_in_another_dtype, "layer 2: experts stored as float16, float32"),
    "NaN in an expert weight": (_nan_in_expert, f"NaN in {EXPERT_W1} (layer 2, expert 3) at [5, 7]"),
    "Inf in an attention weight": (
        _inf_in_attention,
        "-Inf in model.layers.1.self_attn.o_proj.weight (layer 1)",
    ),
}


def assert_clean_failure(result, output: Path | None, fragment: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in lines[0], lines[0]
    if output is not None:
        assert not output.exists()
        assert not list(output.parent.glob(f".{output.name}.*")), "staging folder left behind"


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_broken_checkpoint_is_refused(case: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    breakage, fragment = BREAKAGES[case]
    folder = _copy(tiny_models, tmp_path)
    breakage(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    output = tmp_path / "out"
    assert_clean_failure(invoke_cli("fuse", str(folder), "-o", str(output)), output, fragment)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, "input was modified"


@pytest.mark.parametrize(
    "case",
    [
        "corrupt header",
        "truncated shard",
        "dense model",
        "pickle only",
        "config lies about experts",
        "expert shape contradicts config",
        "config lies about hidden size",
        "config value of the wrong type",
        "config routes to more experts than it has",
        "config dtype unknown",
        "config of another family",
        "config overcounts the layers",
    ],
)
def test_inspect_refuses_too(case: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    breakage, fragment = BREAKAGES[case]
    folder = _copy(tiny_models, tmp_path)
    breakage(folder)
    assert_clean_failure(invoke_cli("inspect", str(folder)), None, fragment)


@pytest.mark.parametrize("groups", [{"n_group": 3}, {"topk_group": 5}])
def test_group_limited_routing_that_cannot_route_is_refused(
    groups: dict[str, int], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """DeepSeek-V3 picks topk_group of n_group equal groups before its top-k: 8 experts do not split
    into 3 groups, and 5 of 4 groups cannot be picked (the router would fail mid-run otherwise)."""
    folder = _copy(tiny_models, tmp_path, "deepseek_v3")
    _edit_config(folder, **groups)
    assert_clean_failure(invoke_cli("inspect", str(folder)), None, "group-limited routing needs equal groups")


def test_a_dense_model_of_an_moe_family_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Granite 4.0-H-Micro is Granite 4.0-H's hybrid without experts (num_local_experts 0)."""
    folder = _copy(tiny_models, tmp_path, "granitemoehybrid")
    _edit_config(folder, num_local_experts=0)
    for command in ("inspect", "fuse", "quantize"):
        out = () if command == "inspect" else ("-o", str(tmp_path / "out"))
        result = invoke_cli(command, str(folder), *out)
        assert_clean_failure(result, tmp_path / "out", "num_local_experts=0 makes it a dense model")


@pytest.mark.parametrize("kinds", [["dense", "sparse"], ["dense", "sparse", "moe"]])
def test_layer_kinds_that_do_not_name_every_layer_are_refused(
    kinds: list[str], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """GLM-4.7-Flash lists each layer's MLP kind: a list one short, or with a kind transformers does not
    know, is refused in one line before anything reads the layer it cannot place."""
    folder = _copy(tiny_models, tmp_path, "glm4_moe_lite")
    _edit_config(folder, mlp_layer_types=kinds)
    assert_clean_failure(
        invoke_cli("inspect", str(folder)), None, "(needs one of 'dense' or 'sparse' for each"
    )


@pytest.mark.parametrize(
    ("top_k", "fragment"),
    [
        ([2, 4, 2], "(a top-k that differs between layers is not supported)"),
        ([9, 9, 9], "1 <= top-k <= experts"),
    ],
)
def test_per_layer_top_k_that_does_not_route_alike_is_refused(
    top_k: list[int], fragment: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Hunyuan lists its top-k once per layer: a list whose layers disagree, or agree on more experts than
    there are, is refused in one line (the tiny model's own list, [2, 2, 2], routes: test_inspect)."""
    folder = _copy(tiny_models, tmp_path, "hunyuan_v1_moe")
    _edit_config(folder, moe_topk=top_k)
    assert_clean_failure(invoke_cli("inspect", str(folder)), None, fragment)


# --json: the report goes to stdout and no progress bar to stderr, which is left to the error line
QUANTIZE = ("--method", "rtn", "--bits", "8", "--group-size", "32", "--no-verify", "--json")


@pytest.mark.parametrize(
    "case",
    [
        "attention shape contradicts config",
        "corrupt header",
        "index points outside the folder",
        "duplicate tensor across shards",
        "unknown dtype",
        "expert shape contradicts config",
        "config lies about experts",
        "config routes to more experts than it has",
        "config undercounts the layers",
        "experts in two dtypes",
        "missing expert tensor",
        "NaN in an expert weight",
        "pickle only",
    ],
)
def test_quantize_refuses_too(case: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """quantize reads through the same reader and plan as fuse, so it refuses the same way."""
    breakage, fragment = BREAKAGES[case]
    folder = _copy(tiny_models, tmp_path)
    breakage(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    output = tmp_path / "out"
    assert_clean_failure(invoke_cli("quantize", str(folder), "-o", str(output), *QUANTIZE), output, fragment)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, "input was modified"


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "fused"])
def test_a_quantized_checkpoint_is_refused_as_a_source(
    fmt: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Requantizing rounded weights compounds their error, and packed tensors are not weights: quantize
    (dry runs too), fuse and unfuse name the quantization instead of tripping over its tensors."""
    from moeconvert.pipeline import QuantizeOptions, quantize
    from moeconvert.quant.scheme import Scheme

    quantized = tmp_path / "quantized"
    options = QuantizeOptions(format=fmt)
    quantize(str(tiny_models["mixtral"]), Scheme(bits=8, group_size=32, method="rtn"), output=quantized,
             options=options, verify=False, progress=False)  # fmt: skip
    method = json.loads((quantized / "config.json").read_text())["quantization_config"]["quant_method"]
    attempts = [("quantize", QUANTIZE)]
    if fmt == "compressed-tensors":
        attempts += [("quantize", ("--dry-run",)), ("fuse", ()), ("unfuse", ())]
    for command, extra in attempts:
        output = tmp_path / "again"
        assert_clean_failure(
            invoke_cli(command, str(quantized), "-o", str(output), *extra),
            output,
            f"already quantized (quantization_config.quant_method {method!r}): {command} needs",
        )


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "the", "of", "and", "a", "to", "in", "is", "it"]
    vocab = {word: i for i, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)


def test_remote_code_is_never_run(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """config.json and tokenizer_config.json name custom code (auto_map); every command that builds a
    config, model or tokenizer uses transformers' built-in classes, so the code is never imported."""
    folder = _copy(tiny_models, tmp_path)
    marker = tmp_path / "remote-code-ran"
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    _edit_config(
        folder,
        auto_map={"AutoConfig": "configuration_evil.Config", "AutoModelForCausalLM": "modeling_evil.Model"},
    )
    _write_tokenizer(folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.Slow", "tokenization_evil.Fast"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    fused, quantized = tmp_path / "fused", tmp_path / "quantized"
    gptq = ("--bits", "8", "--group-size", "32", "--samples", "4", "--seq-len", "32", "--no-verify")
    for command in (
        ["inspect", str(folder)],
        ["fuse", str(folder), "-o", str(fused)],
        ["verify", str(folder), str(fused)],
        ["quantize", str(folder), "-o", str(quantized), *gptq],  # GPTQ: loads the tokenizer to calibrate
    ):
        result = run_cli(*command)
        assert result.returncode == 0, (command, result.stderr)
    assert not marker.exists(), "remote code ran"


def test_pickle_is_never_loaded(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A pickle that would leave a marker when unpickled: refused by name, never opened."""
    folder = _copy(tiny_models, tmp_path)
    _pickle_only(folder)
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(str(marker))))
    for command in (["inspect", str(folder)], ["fuse", str(folder), "-o", str(tmp_path / "out")]):
        assert_clean_failure(run_cli(*command), None, "never loaded")
    assert not marker.exists(), "the pickle was loaded"


class _Trap:
    """Unpickling calls ``open(path, "w")``: the file appears only if someone loads the pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def test_missing_folder(tmp_path: Path) -> None:
    output = tmp_path / "out"
    assert_clean_failure(run_cli("fuse", str(tmp_path / "nope"), "-o", str(output)), output, "no such folder")


def test_existing_output_needs_force(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    result = invoke_cli("fuse", str(tiny_models["olmoe"]), "-o", str(output))
    assert result.returncode == 2 and "--force" in result.stderr
    assert (output / "keep.txt").read_text() == "precious"
    forced = invoke_cli("fuse", str(tiny_models["olmoe"]), "-o", str(output), "--force")
    assert forced.returncode == 0, forced.stderr
    assert not (output / "keep.txt").exists() and (output / "config.json").exists()


def test_an_output_over_the_input_is_refused_even_with_force(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The output is replaced as a whole: over the input folder, a folder holding it or one inside it,
    --force would delete the input."""
    model = Path(shutil.copytree(tiny_models["olmoe"], tmp_path / "parent" / "model"))
    (tmp_path / "parent" / "notes.txt").write_text("precious")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    quantize = ["--group-size", "32", "--samples", "4", "--seq-len", "32", "--no-verify"]
    for command, output, extra in [
        ("fuse", model, []),
        ("fuse", tmp_path / "parent", []),
        ("quantize", model, quantize),
        ("quantize", model / "inside", quantize),
    ]:
        result = invoke_cli(command, str(model), "-o", str(output), "--force", *extra)
        assert result.returncode == 2 and "overlaps the input" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--min-tokens", "-1"], "--min-tokens"),
        (["--experts-per-chunk", "0"], "--experts-per-chunk"),
        (["--device", "bogus"], "--device must be auto, cpu, cuda or cuda:N"),
        (["--calib", "CALIB"], "not UTF-8 text"),
        (["--report", "/nonexistent/report.json"], "/nonexistent is not a folder"),
    ],
)
def test_bad_options_stop_before_any_partial_output(
    args: list[str], fragment: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A typo must not leave a partial output that then blocks the corrected command."""
    calib = tmp_path / "calib.jsonl"
    calib.write_bytes(b'{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    args = [str(calib) if a == "CALIB" else a for a in args]
    out = tmp_path / "out"
    quantize = ["--group-size", "32", "--samples", "4", "--seq-len", "32", "--no-verify"]
    result = invoke_cli("quantize", str(tiny_models["olmoe"]), "-o", str(out), *quantize, *args)
    assert result.returncode == 2 and fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_an_output_that_is_a_symlink_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    (tmp_path / "link").symlink_to(target)
    result = invoke_cli("fuse", str(tiny_models["olmoe"]), "-o", str(tmp_path / "link"), "--force")
    assert result.returncode == 2 and "is a symbolic link" in result.stderr, result.stderr
    assert (target / "keep.txt").read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == [
        "link",
        "target",
    ]


def test_an_output_that_cannot_be_a_folder_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """An empty -o (an unset variable), a path through a file, or the root: one line, nothing written."""
    (tmp_path / "afile").write_text("precious")
    for output, fragment in [
        ("", "'--output': is empty"),
        (str(tmp_path / "afile" / "sub"), f"cannot create the output folder {tmp_path}/afile/sub: {tmp_path}/afile is not a folder"),
        ("/", "the output cannot be the root folder"),
    ]:  # fmt: skip
        result = invoke_cli("fuse", str(tiny_models["olmoe"]), "-o", output, "--force", cwd=tmp_path)
        assert result.returncode == 2 and fragment in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and "free space" not in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["afile"] and (
        tmp_path / "afile"
    ).read_text() == "precious"


@pytest.mark.parametrize("family", ["qwen3_moe", "granitemoehybrid"])  # experts per expert, and stacked
def test_fuse_twice_and_unfuse_original_are_refused(
    family: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    fused = tmp_path / "fused"
    assert invoke_cli("fuse", str(tiny_models[family]), "-o", str(fused)).returncode == 0
    assert_clean_failure(
        invoke_cli("fuse", str(fused), "-o", str(tmp_path / "again")), tmp_path / "again", "already fused"
    )
    assert_clean_failure(
        invoke_cli("unfuse", str(tiny_models[family]), "-o", str(tmp_path / "un")),
        tmp_path / "un",
        "not fused",
    )


def test_bad_shard_size(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "out"
    result = run_cli("fuse", str(tiny_models["olmoe"]), "-o", str(output), "--max-shard-size", "lots")
    assert_clean_failure(result, output, "invalid size")


def test_help_on_every_command() -> None:
    for command in ["inspect", "fuse", "unfuse", "tiny"]:
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "Usage:" in result.stdout
    assert run_cli("--version").stdout.strip().endswith("0.1.0")


def test_an_unknown_family_is_answered_with_each_supported_family_once() -> None:
    """Vision-language families also accept their text model's own type (``qwen3_5_moe_text``); the
    list a user reads names each family once, by its checkpoint's type."""
    from moeconvert.errors import UnsupportedModelError
    from moeconvert.families import FAMILIES, family_for

    with pytest.raises(UnsupportedModelError) as refused:
        family_for({"model_type": "llama"})
    listed = str(refused.value).split("supported: ")[1].split(", ")
    assert "qwen3_5_moe_text" in FAMILIES and "qwen3_5_moe" in listed
    assert not any(name.endswith("_text") for name in listed) and len(listed) == len(set(listed))


def test_qwen3_vl_moe_stacks_in_neither_orientation_are_refused(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A config.json whose expert size fits neither orientation of a Qwen3-VL-MoE release's stacks: every
    command names the stack and the shape the config implies, not "already fused"."""
    folder = _copy(tiny_models, tmp_path, "qwen3_vl_moe")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["moe_intermediate_size"] = 80
    (folder / "config.json").write_text(json.dumps(config))
    fragment = "mlp.experts.down_proj has shape [8, 96, 64], but config.json implies [8, 64, 80]"
    for command, *args in (("fuse",), ("quantize", "--seq-len", "64")):
        output = tmp_path / command
        assert_clean_failure(invoke_cli(command, str(folder), "-o", str(output), *args), output, fragment)
    assert_clean_failure(invoke_cli("inspect", str(folder)), None, fragment)


def test_a_stacked_layer_without_one_of_its_stacks_is_refused(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A fused checkpoint (``fuse``'s output, or a release in the runtime layout) whose layer lost one of
    its two expert stacks: every command that reads it names the layer and the stack, before any work,
    instead of failing in the layer's forward pass with a traceback."""
    fused = tmp_path / "fused"
    assert invoke_cli("fuse", str(tiny_models["mixtral"]), "-o", str(fused)).returncode == 0
    stack = "model.layers.1.mlp.experts.down_proj"
    shard = fused / "model.safetensors"  # one shard: no index to mend
    tensors = load_file(shard)
    del tensors[stack]
    save_file(tensors, shard, metadata={"format": "pt"})
    fragment = "layer 1: has no mlp.experts.down_proj beside the other expert stack"
    output = tmp_path / "out"
    quantized = invoke_cli("quantize", str(fused), "-o", str(output), "--group-size", "32", "--seq-len", "64")
    assert_clean_failure(quantized, output, fragment)
    assert_clean_failure(invoke_cli("verify", str(tiny_models["mixtral"]), str(fused)), None, fragment)


def _sparse_checkpoint(folder: Path, at_least: int, intermediate_size: int = 65536) -> Path:
    """A Mixtral checkpoint of at least ``at_least`` bytes that takes no disk: real headers for every
    tensor of transformers' model of its config, over files that are holes (zeros when read), a layer
    per shard as releases shard them."""
    from transformers import MixtralConfig

    from moeconvert.forward import text_causal_lm

    per_layer = 8 * 3 * 1024 * intermediate_size * 2  # 8 experts, 3 projections in bf16: 3.2 GB at 65536
    config = MixtralConfig(
        vocab_size=256, hidden_size=1024, intermediate_size=intermediate_size, num_local_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=-(-at_least // per_layer), num_attention_heads=8, num_key_value_heads=8,
    )  # fmt: skip
    with torch.device("meta"):
        shapes = {name: list(t.shape) for name, t in text_causal_lm(config).state_dict().items()}
    shards: dict[str, dict[str, list[int]]] = {}
    for name, shape in sorted(shapes.items()):
        layer = name.split(".")[2] if name.startswith("model.layers.") else "top"
        shards.setdefault(f"model-{layer}.safetensors", {})[name] = shape
    folder.mkdir()
    config.save_pretrained(folder)
    weight_map = {}
    for file, tensors in shards.items():
        header, offset = {}, 0
        for name, shape in tensors.items():
            size = 2 * int(torch.Size(shape).numel())
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = file
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        with (folder / file).open("wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)) + encoded)
            handle.truncate(8 + len(encoded) + offset)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_an_output_the_disk_cannot_hold_is_refused_before_any_work(tmp_path: Path) -> None:
    """A run whose output would fill the disk stops at once, saying how much it writes and how much is
    free, rather than after hours: here a checkpoint larger than the free space, held as a sparse file."""
    free = shutil.disk_usage(tmp_path).free
    try:
        # 4-bit codes and scales take under 30% of bf16 weights: four times what is free, then
        source = _sparse_checkpoint(tmp_path / "huge", at_least=4 * (free + (10 << 30)))
    except OSError as err:  # a filesystem without sparse files this large
        pytest.skip(f"no sparse file larger than the free space here: {err}")
    for command in (
        ["unfuse", str(source)],
        ["quantize", str(source), "--method", "rtn", "--group-size", "32"],
    ):
        out = tmp_path / "out"
        result = subprocess.run(  # no file over 64 MB: without the check, a failed write, not a full disk
            [sys.executable, "-m", "moeconvert.cli", *command, "-o", str(out)],
            capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"},
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20)),
        )  # fmt: skip
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: not enough disk space for {out}: the run writes about "), line
        assert f"and {tmp_path} has" in line and "free; free space or give an output on another disk" in line
        assert sorted(p.name for p in tmp_path.iterdir()) == ["huge"], "nothing written"


def test_a_run_that_needs_more_memory_than_there_is_says_so_before_any_work(tmp_path: Path) -> None:
    """Experts 4 M wide: each one's GPTQ Hessian of its down projection alone is 64 TB, more memory
    than any machine has. The dry run and the run itself say so before they calibrate anything (the
    run is stopped there); a model that fits says nothing."""
    source = _sparse_checkpoint(tmp_path / "wide", at_least=1, intermediate_size=1 << 22)
    plan = run_cli("quantize", str(source), "--dry-run", "--group-size", "32", "-o", str(tmp_path / "out"))
    assert plan.returncode == 0, plan.stderr
    assert "note: the run needs about" in plan.stderr and "so it may be stopped for memory" in plan.stderr
    needs = float(plan.stderr.split("needs about ")[1].split(" GB")[0])
    assert needs > 64_000, plan.stderr
    command = [sys.executable, "-m", "moeconvert.cli", "quantize", str(source), "--group-size", "32"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    run = subprocess.Popen(
        [*command, "-o", str(tmp_path / "out")], stderr=subprocess.PIPE, text=True, env=env
    )
    assert run.stderr is not None
    try:
        first = run.stderr.readline()
    finally:
        run.kill()
        run.wait()
    assert first.startswith("note: the run needs about"), first
    small = _sparse_checkpoint(tmp_path / "small", at_least=1, intermediate_size=256)
    fits = run_cli("quantize", str(small), "--dry-run", "--group-size", "32", "-o", str(tmp_path / "out"))
    assert fits.returncode == 0 and "stopped for memory" not in fits.stderr, fits.stderr
