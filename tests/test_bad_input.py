"""Bad input: one line on stderr, exit code 2, no traceback, nothing at the output path."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import run_cli


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


BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "corrupt header": (_corrupt_header, "not valid JSON"),
    "header larger than file": (_huge_header, "larger than the file"),
    "truncated shard": (_truncate, "truncated"),
    "index names a missing file": (_drop_shard, "missing"),
    "index points outside the folder": (_index_escapes, "outside the model folder"),
    "pickle only": (_pickle_only, "pickle"),
    "dense model": (_dense, "supported: deepseek_v2"),
    "config lies about experts": (_lying_config, "says 6 experts"),
    "missing expert tensor": (_missing_expert, "expert 3 has no w2"),
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
    assert_clean_failure(run_cli("fuse", str(folder), "-o", str(output)), output, fragment)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, "input was modified"


@pytest.mark.parametrize("case", ["corrupt header", "truncated shard", "dense model", "pickle only"])
def test_inspect_refuses_too(case: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    breakage, fragment = BREAKAGES[case]
    folder = _copy(tiny_models, tmp_path)
    breakage(folder)
    assert_clean_failure(run_cli("inspect", str(folder)), None, fragment)


def test_missing_folder(tmp_path: Path) -> None:
    output = tmp_path / "out"
    assert_clean_failure(run_cli("fuse", str(tmp_path / "nope"), "-o", str(output)), output, "no such folder")


def test_existing_output_needs_force(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    result = run_cli("fuse", str(tiny_models["olmoe"]), "-o", str(output))
    assert result.returncode == 2 and "--force" in result.stderr
    assert (output / "keep.txt").read_text() == "precious"
    forced = run_cli("fuse", str(tiny_models["olmoe"]), "-o", str(output), "--force")
    assert forced.returncode == 0, forced.stderr
    assert not (output / "keep.txt").exists() and (output / "config.json").exists()


def test_fuse_twice_and_unfuse_original_are_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    fused = tmp_path / "fused"
    assert run_cli("fuse", str(tiny_models["qwen3_moe"]), "-o", str(fused)).returncode == 0
    assert_clean_failure(
        run_cli("fuse", str(fused), "-o", str(tmp_path / "again")), tmp_path / "again", "already fused"
    )
    assert_clean_failure(
        run_cli("unfuse", str(tiny_models["qwen3_moe"]), "-o", str(tmp_path / "un")),
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
