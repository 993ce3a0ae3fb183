"""The Hub path through the real huggingface_hub client against a local Hub-compatible server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_tensors, run_cli
from hub_server import HubServer, hub_env
from transformers.utils import IMAGE_PROCESSOR_NAME, PROCESSOR_NAME, VIDEO_PROCESSOR_NAME

from moeconvert import fuse, inspect_model
from moeconvert.tiny import build_tiny_model

TOKEN = "hf_testtoken0123456789"
PROCESSOR_FILES = (IMAGE_PROCESSOR_NAME, VIDEO_PROCESSOR_NAME, PROCESSOR_NAME)


@pytest.fixture(scope="module")
def hub(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """A server holding acme/tiny-mixtral (main: with decoy pickle and extra safetensors files;
    branch v2: a different model), acme/pickle-only, a private acme/secret-moe, and acme/glob-index
    (as main, with an index entry that is a pattern)."""
    root = tmp_path_factory.mktemp("hub")
    repo = Path(shutil.copytree(tiny_models["mixtral"], root / "src-main"))
    (repo / "pytorch_model.bin").write_bytes(b"never unpickled")
    shutil.copy(sorted(repo.glob("model-*.safetensors"))[0], repo / "consolidated.safetensors")
    (repo / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    for name in PROCESSOR_FILES:  # what a vision-language model's processor is saved as (distinct
        (repo / name).write_text(json.dumps({"saved_as": name}))  # bytes: the cache shares equal blobs)
    v2 = build_tiny_model("mixtral", root / "src-v2", seed=99)  # one 2 MB file
    pickle_only = root / "src-pickle"
    pickle_only.mkdir()
    (pickle_only / "config.json").write_text((repo / "config.json").read_text())
    (pickle_only / "pytorch_model.bin").write_bytes(b"never unpickled")
    globbed = Path(shutil.copytree(repo, root / "src-glob"))  # an index that names a pattern
    index = json.loads((globbed / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = "*"
    (globbed / "model.safetensors.index.json").write_text(json.dumps(index))
    with HubServer(root / "server", token=TOKEN) as server:
        server.add_repo("acme/tiny-mixtral", repo)
        server.v2_sha = server.add_repo("acme/tiny-mixtral", v2, revision="v2")
        server.add_repo("acme/pickle-only", pickle_only)
        server.add_repo("acme/secret-moe", tiny_models["olmoe"], private=True)
        server.add_repo("acme/single-file", v2)
        server.add_repo("acme/glob-index", globbed)
        yield server


def _env(server: HubServer, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": "",
        **extra,
    }


def _downloaded(server: HubServer, start: int) -> set[str]:
    return {
        r.path.rsplit("/", 1)[-1]
        for r in server.request_log[start:]
        if r.method == "GET" and "/resolve/" in r.path
    }


def test_fuse_downloads_only_what_it_needs(
    hub: HubServer, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    start = len(hub.request_log)
    out = tmp_path / "out"
    result = run_cli("fuse", "acme/tiny-mixtral", "-o", str(out), env=_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    local = fuse(str(tiny_models["mixtral"]), tmp_path / "local")
    ours, expected = load_tensors(out), load_tensors(local)
    assert sorted(ours) == sorted(expected) and all(torch.equal(ours[k], expected[k]) for k in expected)
    fetched = _downloaded(hub, start)
    assert "pytorch_model.bin" not in fetched and "consolidated.safetensors" not in fetched
    assert {
        "config.json",
        "model.safetensors.index.json",
        "tokenizer_config.json",
        *PROCESSOR_FILES,
    } <= fetched
    assert all((out / name).exists() for name in ("tokenizer_config.json", *PROCESSOR_FILES))

    # Offline, from the cache the first run filled: same result, no request at all.
    start = len(hub.request_log)
    offline = run_cli(
        "fuse",
        "acme/tiny-mixtral",
        "-o",
        str(tmp_path / "offline"),
        env=_env(hub, tmp_path, HF_HUB_OFFLINE="1"),
    )
    assert offline.returncode == 0, offline.stderr
    assert len(hub.request_log) == start
    again = load_tensors(tmp_path / "offline")
    assert all(torch.equal(again[k], ours[k]) for k in ours)


@pytest.mark.parametrize("how", ["at", "option", "sha"])
def test_revision(hub: HubServer, tmp_path: Path, how: str) -> None:
    model, args = {
        "at": ("acme/tiny-mixtral@v2", []),
        "option": ("acme/tiny-mixtral", ["--revision", "v2"]),
        "sha": (f"acme/tiny-mixtral@{hub.v2_sha}", []),
    }[how]
    result = run_cli("fuse", model, *args, "-o", str(tmp_path / "out"), env=_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    v2 = load_tensors(hub.root.parent / "src-v2")
    fused = load_tensors(tmp_path / "out")
    assert torch.equal(
        fused["model.layers.0.mlp.gate.weight"], v2["model.layers.0.block_sparse_moe.gate.weight"]
    )


def test_inspect_reads_headers_only(
    hub: HubServer, tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_env(hub, monkeypatch, tmp_path)
    start = len(hub.request_log)
    sharded = inspect_model("acme/tiny-mixtral")
    local = inspect_model(str(tiny_models["mixtral"]))
    assert (sharded.total_params, sharded.active_params, sharded.shards) == (
        local.total_params,
        local.active_params,
        local.shards,
    )
    assert sharded.disk_bytes["download"] == local.disk_bytes["fused_output"]
    single = inspect_model("acme/single-file")
    assert single.total_params == inspect_model(str(hub.root.parent / "src-v2")).total_params
    weight_reads = [
        r for r in hub.request_log[start:] if r.path.endswith(".safetensors") and r.method == "GET"
    ]
    assert len(weight_reads) == sharded.shards + 1, "one header read per shard"
    assert all(r.headers.get("range", "").startswith("bytes=0-") for r in weight_reads)
    single_file_bytes = (hub.root.parent / "src-v2" / "model.safetensors").stat().st_size
    assert weight_reads[-1].body_bytes < single_file_bytes / 10


def test_missing_repo_and_revision(hub: HubServer, tmp_path: Path) -> None:
    for model, fragment in [
        ("acme/nothing-here", "no such model"),
        ("acme/tiny-mixtral@nope", "no revision"),
    ]:
        for command in (["fuse", model, "-o", str(tmp_path / "out")], ["inspect", model]):
            result = run_cli(*command, env=_env(hub, tmp_path))
            assert result.returncode == 2, result.stderr
            assert fragment in result.stderr and "Traceback" not in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
            assert not (tmp_path / "out").exists()


def test_pickle_only_repo(hub: HubServer, tmp_path: Path) -> None:
    start = len(hub.request_log)
    for command in (
        ["fuse", "acme/pickle-only", "-o", str(tmp_path / "out")],
        ["inspect", "acme/pickle-only"],
    ):
        result = run_cli(*command, env=_env(hub, tmp_path))
        assert result.returncode == 2 and "pickle" in result.stderr and "Traceback" not in result.stderr
    assert "pytorch_model.bin" not in _downloaded(hub, start)


def test_private_repo_needs_the_token(hub: HubServer, tmp_path: Path) -> None:
    denied = run_cli("inspect", "acme/secret-moe", env=_env(hub, tmp_path))
    assert denied.returncode == 2 and "HF_TOKEN" in denied.stderr
    allowed = run_cli(
        "fuse", "acme/secret-moe", "-o", str(tmp_path / "out"), env=_env(hub, tmp_path, HF_TOKEN=TOKEN)
    )
    assert allowed.returncode == 0, allowed.stderr
    assert TOKEN not in allowed.stdout + allowed.stderr
    assert not any(
        TOKEN in p.read_text(errors="ignore") for p in (tmp_path / "out").iterdir() if p.suffix == ".json"
    )


def test_quantize_dry_run_downloads_no_weights(hub: HubServer, tmp_path: Path) -> None:
    start = len(hub.request_log)
    result = run_cli(
        "quantize",
        "acme/tiny-mixtral",
        "--dry-run",
        "--json",
        "--group-size",
        "32",
        env=_env(hub, tmp_path),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["quantized_modules"] == 3 * (8 * 3 + 4)
    weight_gets = [
        r for r in hub.request_log[start:] if r.path.endswith(".safetensors") and r.method == "GET"
    ]
    assert weight_gets and all(r.headers.get("range", "").startswith("bytes=0-") for r in weight_gets)
    assert not list(tmp_path.glob("tiny-mixtral*")), "a dry run writes nothing"


def test_index_patterns_are_refused_before_any_weight_download(hub: HubServer, tmp_path: Path) -> None:
    """Index entries become download patterns: "*" would fetch the whole repository, pickles included."""
    start = len(hub.request_log)
    result = run_cli("fuse", "acme/glob-index", "-o", str(tmp_path / "out"), env=_env(hub, tmp_path))
    assert result.returncode == 2 and "'*', which is a pattern" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert not any(name.endswith((".safetensors", ".bin")) for name in _downloaded(hub, start))


def test_an_unreachable_hub_is_one_line(hub: HubServer, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """With the network gone, an uncached model and a push fail in one line that says what to do, at once
    (not after the HTTP client's retries, each of which printed a line); a cached model is read from the
    cache as with HF_HUB_OFFLINE, with a one-line note."""
    cached = run_cli("fuse", "acme/single-file", "-o", str(tmp_path / "first"), env=_env(hub, tmp_path))
    assert cached.returncode == 0, cached.stderr
    env = {**_env(hub, tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": TOKEN}  # nothing listens
    note = "note: the Hub cannot be reached; acme/single-file is read from the local cache"
    for args, code, fragment in [
        (
            ["inspect", "acme/tiny-mixtral"],
            2,
            "not in the local Hugging Face cache, and the Hub cannot be reached",
        ),
        (
            ["fuse", "acme/tiny-mixtral", "-o", str(tmp_path / "none")],
            2,
            "not in the local Hugging Face cache",
        ),
        (["push", str(tiny_models["mixtral"]), "acme/pushed"], 3, "is intact"),
        (["inspect", "acme/single-file"], 0, note),
        (["fuse", "acme/single-file", "-o", str(tmp_path / "out")], 0, note),
    ]:
        result = run_cli(*args, env=env)
        assert result.returncode == code, result.stderr
        assert fragment in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "none").exists()
    first, out = load_tensors(tmp_path / "first"), load_tensors(tmp_path / "out")
    assert sorted(first) == sorted(out) and all(torch.equal(first[k], out[k]) for k in first)


def test_a_proxy_leaves_reachability_to_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind a proxy this machine may resolve no names at all: no direct connection is tried."""
    from moeconvert.source import hub_accepts_connections

    assert not hub_accepts_connections("http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert hub_accepts_connections("http://127.0.0.1:9")
