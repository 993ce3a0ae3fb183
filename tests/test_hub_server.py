"""The test Hub server, exercised through the real, unpatched ``huggingface_hub`` client."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import huggingface_hub
import pytest
import torch
from hub_server import HubServer, hub_env
from huggingface_hub import HfApi, get_safetensors_metadata, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file

TOKEN = "hf_test_token"

# The client's own LFS PUT passes a file object as `data=`, which its HTTP library deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    with HubServer(tmp_path / "hub_root") as hub:
        hub_env(hub, monkeypatch, tmp_path)
        yield hub


@pytest.fixture
def auth_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    with HubServer(tmp_path / "hub_root", token=TOKEN) as hub:
        hub_env(hub, monkeypatch, tmp_path)
        yield hub


def read_tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def make_model(folder: Path, n_rows: int = 8) -> Path:
    """A small model folder: config, a nested text file and one safetensors file."""
    (folder / "docs").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"num_experts": 4}))
    (folder / "docs" / "notes.txt").write_text("nested file")
    save_file(
        {"w": torch.arange(n_rows * 4, dtype=torch.float32).reshape(n_rows, 4)}, folder / "model.safetensors"
    )
    return folder


def make_sharded_model(folder: Path) -> Path:
    """Two safetensors shards (each ~128 KiB, above the client's 100 kB first read) plus the index."""
    folder.mkdir(parents=True)
    shards = {
        "model-00001-of-00002.safetensors": {"a.weight": torch.zeros(128, 256), "a.bias": torch.zeros(128)},
        "model-00002-of-00002.safetensors": {"b.weight": torch.ones(256, 256, dtype=torch.bfloat16)},
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": 123}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


# ------------------------------------------------------------------------------------ downloads


def test_snapshot_download_branch_and_sha_then_offline(
    server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_model(tmp_path / "src")
    sha = server.add_repo("org/model", src)
    cache = tmp_path / "cache"
    patterns = ["*.json", "*.safetensors", "docs/*"]

    by_branch = Path(
        snapshot_download("org/model", revision="main", allow_patterns=patterns, cache_dir=cache)
    )
    assert by_branch.name == sha
    assert read_tree(by_branch) == read_tree(src)
    assert (cache / "models--org--model" / "refs" / "main").read_text() == sha

    fresh_cache = tmp_path / "cache2"
    by_sha = Path(snapshot_download("org/model", revision=sha, cache_dir=fresh_cache))
    assert read_tree(by_sha) == read_tree(src)
    assert ("GET", "/api/models/org/model/revision/main") in server.requests
    # A commit sha needs no resolution: the client goes straight to the tree listing.
    assert server.requests.count(("GET", "/api/models/org/model/revision/main")) == 1

    only_json = snapshot_download("org/model", allow_patterns=["*.json"], cache_dir=tmp_path / "cache3")
    assert read_tree(Path(only_json)) == {"config.json": (src / "config.json").read_bytes()}
    assert ("GET", f"/org/model/resolve/{sha}/model.safetensors") in server.requests  # from the earlier calls

    server.stop()  # offline mode must not need the server at all
    hub_env(server, monkeypatch, tmp_path, offline=True)
    offline = snapshot_download("org/model", revision="main", allow_patterns=patterns, cache_dir=cache)
    assert Path(offline) == by_branch and read_tree(Path(offline)) == read_tree(src)
    assert Path(snapshot_download("org/model", revision=sha, cache_dir=fresh_cache)) == by_sha
    assert (
        Path(hf_hub_download("org/model", "config.json", cache_dir=cache)).read_text() == '{"num_experts": 4}'
    )


def test_hf_hub_download_and_repo_metadata(server: HubServer, tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    sha = server.add_repo("org/model", src)
    dev_sha = server.add_repo("org/model", make_model(tmp_path / "src_dev", n_rows=2), revision="dev")
    api = HfApi()

    path = hf_hub_download("org/model", "docs/notes.txt")
    assert Path(path).read_text() == "nested file" and sha in path
    dev_path = hf_hub_download("org/model", "model.safetensors", revision="dev")
    assert Path(dev_path).read_bytes() == (tmp_path / "src_dev" / "model.safetensors").read_bytes()

    info = api.model_info("org/model", revision="main", files_metadata=True)
    assert info.sha == sha and info.private is False
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {"config.json", "docs/notes.txt", "model.safetensors"}
    assert siblings["config.json"].lfs is None and siblings["config.json"].size == len(b'{"num_experts": 4}')
    safetensors_bytes = (src / "model.safetensors").read_bytes()
    assert siblings["model.safetensors"].lfs.size == len(safetensors_bytes)
    assert huggingface_hub.model_info("org/model", revision="dev").sha == dev_sha  # module-level shortcut

    assert sorted(api.list_repo_files("org/model")) == ["config.json", "docs/notes.txt", "model.safetensors"]
    top = {entry.path: type(entry).__name__ for entry in api.list_repo_tree("org/model")}
    assert top == {"config.json": "RepoFile", "docs": "RepoFolder", "model.safetensors": "RepoFile"}
    assert [e.path for e in api.list_repo_tree("org/model", path_in_repo="docs")] == ["docs/notes.txt"]
    refs = api.list_repo_refs("org/model")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": sha, "dev": dev_sha}

    assert api.file_exists("org/model", "config.json")
    assert not api.file_exists("org/model", "missing.json")
    assert not api.file_exists("org/model", "config.json", revision="no-such-branch")
    assert api.repo_exists("org/model")
    assert not api.repo_exists("org/missing")
    assert api.revision_exists("org/model", "dev") and not api.revision_exists("org/model", "nope")


def test_subprocesses_inherit_the_environment(server: HubServer, tmp_path: Path) -> None:
    """CLI tests run the tool in a subprocess: the variables set by hub_env are enough there."""
    sha = server.add_repo("org/model", make_model(tmp_path / "src"))
    code = "import huggingface_hub as h; print(h.hf_hub_download('org/model', 'config.json'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    path = Path(result.stdout.strip())
    assert path.is_relative_to(tmp_path / "hf_home" / "hub") and sha in str(path)
    assert ("GET", "/org/model/resolve/main/config.json") in server.requests


def test_resolve_headers_and_ranges(server: HubServer, tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    sha = server.add_repo("org/model", src)
    data = (src / "model.safetensors").read_bytes()
    url = f"{server.url}/org/model/resolve/main/model.safetensors"

    def fetch(headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    status, headers, body = fetch({})
    assert (status, body) == (200, data)
    assert headers["X-Repo-Commit"] == sha and headers["Content-Length"] == str(len(data))
    assert headers["ETag"] == headers["X-Linked-Etag"] and headers["X-Linked-Size"] == str(len(data))
    assert fetch({"Range": "bytes=2-9"})[::2] == (206, data[2:10])
    assert fetch({"Range": "bytes=2-9"})[1]["Content-Range"] == f"bytes 2-9/{len(data)}"
    assert fetch({"Range": "bytes=-5"})[2] == data[-5:]
    assert fetch({"Range": "bytes=10-"})[2] == data[10:]
    status, headers, _ = fetch({"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"


def test_get_safetensors_metadata_reads_only_headers(server: HubServer, tmp_path: Path) -> None:
    single = make_model(tmp_path / "single", n_rows=50_000)  # 800 kB: most of it must not be downloaded
    server.add_repo("org/single", single)
    sharded = make_sharded_model(tmp_path / "sharded")
    server.add_repo("org/sharded", sharded, revision="v1")

    meta = get_safetensors_metadata("org/single", revision="main")
    assert not meta.sharded and meta.weight_map == {"w": "model.safetensors"}
    tensor = meta.files_metadata["model.safetensors"].tensors["w"]
    assert (tensor.dtype, tensor.shape) == ("F32", [50_000, 4])

    meta = HfApi().get_safetensors_metadata("org/sharded", revision="v1")
    assert meta.sharded and meta.metadata == {"total_size": 123}
    assert meta.weight_map["b.weight"] == "model-00002-of-00002.safetensors"
    assert meta.parameter_count == {"F32": 128 * 256 + 128, "BF16": 256 * 256}
    assert meta.files_metadata["model-00001-of-00002.safetensors"].metadata == {"format": "pt"}

    safetensors_gets = [
        r for r in server.request_log if r.method == "GET" and r.path.endswith(".safetensors")
    ]
    assert len(safetensors_gets) == 3
    for record in safetensors_gets:
        assert record.headers["range"] == "bytes=0-100000"
        assert record.status == 206 and record.body_bytes == 100_001
    # The index is an ordinary file download; the shards themselves are never fetched in full.
    assert ("GET", "/org/sharded/resolve/v1/model.safetensors.index.json") in server.requests


def test_missing_repo_revision_and_file_raise_specific_errors(server: HubServer, tmp_path: Path) -> None:
    server.add_repo("org/model", make_model(tmp_path / "src"))
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/model", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/model", "config.json", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("org/model", revision="nope")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/model", "missing.json")
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("org/model", path_in_repo="no-such-folder"))


def test_private_repo_needs_the_token(auth_server: HubServer, tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    auth_server.add_repo("org/private", src, private=True)
    auth_server.add_repo("org/public", src)
    api = HfApi()

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/private")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/private", cache_dir=tmp_path / "c1")
    assert not api.repo_exists("org/private")
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.model_info("org/public", token="hf_wrong")
    assert excinfo.value.response.status_code == 401

    assert api.model_info("org/private", token=TOKEN).private is True
    folder = snapshot_download("org/private", token=TOKEN, cache_dir=tmp_path / "c2")
    assert read_tree(Path(folder)) == read_tree(src)
    assert api.repo_exists("org/private", token=TOKEN)
    assert read_tree(Path(snapshot_download("org/public", cache_dir=tmp_path / "c3"))) == read_tree(src)


# ------------------------------------------------------------------------------------ uploads


def test_upload_small_and_large_files_round_trip(auth_server: HubServer, tmp_path: Path) -> None:
    folder = make_model(tmp_path / "out")
    (folder / "big.bin").write_bytes(bytes(range(256)) * 5000)  # 1.28 MB: LFS by size
    (folder / "tokenizer.json").write_text("{}")
    api = HfApi(token=TOKEN)

    repo_url = api.create_repo("org/converted", private=True, exist_ok=True)
    assert repo_url.repo_id == "org/converted"
    api.create_repo("org/converted", private=True, exist_ok=True)  # 409 swallowed by exist_ok
    commit = api.upload_folder(folder_path=folder, repo_id="org/converted", commit_message="Convert")
    assert commit.oid == auth_server.commit_sha("org/converted")
    assert auth_server.repo_files("org/converted") == read_tree(folder)
    assert read_tree(tmp_path / "hub_root" / "org" / "converted" / "main") == read_tree(folder)

    lfs_puts = sorted(path for method, path in auth_server.requests if method == "PUT")
    assert len(lfs_puts) == 2  # big.bin and model.safetensors; small files went inline in the commit
    assert ("POST", "/org/converted.git/info/lfs/objects/verify") in auth_server.requests
    tree = {f.path: f for f in api.list_repo_tree("org/converted", recursive=True) if hasattr(f, "lfs")}
    assert tree["big.bin"].lfs is not None and tree["config.json"].lfs is None

    downloaded = snapshot_download("org/converted", token=TOKEN, cache_dir=tmp_path / "cache")
    assert read_tree(Path(downloaded)) == read_tree(folder)

    # Re-uploading unchanged files sends nothing: preupload reports the remote oids.
    auth_server.clear_log()
    api.upload_folder(folder_path=folder, repo_id="org/converted")
    assert not any(method == "PUT" for method, _ in auth_server.requests)
    assert not any("/commit/" in path for _, path in auth_server.requests)


def test_create_branch_and_upload_to_it(auth_server: HubServer, tmp_path: Path) -> None:
    main_sha = auth_server.add_repo("org/model", make_model(tmp_path / "src"))
    api = HfApi(token=TOKEN)
    api.create_branch("org/model", branch="int4")
    api.create_branch("org/model", branch="int4", exist_ok=True)
    assert auth_server.commit_sha("org/model", "int4") == main_sha

    save_file({"q": torch.ones(4, 4, dtype=torch.int8)}, tmp_path / "q.safetensors")
    api.upload_file(
        path_or_fileobj=tmp_path / "q.safetensors",
        path_in_repo="quantized/model.safetensors",
        repo_id="org/model",
        revision="int4",
        commit_message="Add int4 weights",
    )
    api.upload_folder(folder_path=make_model(tmp_path / "v2", n_rows=3), repo_id="org/model", revision="int4")

    files = auth_server.repo_files("org/model", "int4")
    assert files["quantized/model.safetensors"] == (tmp_path / "q.safetensors").read_bytes()
    assert files["model.safetensors"] == (tmp_path / "v2" / "model.safetensors").read_bytes()
    assert auth_server.commit_sha("org/model") == main_sha  # main untouched
    folder = snapshot_download("org/model", revision="int4", token=TOKEN, cache_dir=tmp_path / "cache")
    assert read_tree(Path(folder)) == files
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="org/model", revision="no-branch")


def test_writes_need_the_token(auth_server: HubServer, tmp_path: Path) -> None:
    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi().create_repo("org/new")
    assert excinfo.value.response.status_code == 401
    HfApi(token=TOKEN).create_repo("org/new")
    with pytest.raises(HfHubHTTPError):
        HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="org/new")
    assert auth_server.repo_files("org/new") == {}


def test_fail_next_makes_the_client_raise_then_recover(server: HubServer, tmp_path: Path) -> None:
    folder = make_model(tmp_path / "out")
    api = HfApi()
    api.create_repo("org/flaky")

    server.fail_next("POST", r"/api/models/org/flaky/commit/", status=500)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.upload_folder(folder_path=folder, repo_id="org/flaky")
    assert excinfo.value.response.status_code == 500
    assert server.repo_files("org/flaky") == {}  # nothing committed
    api.upload_folder(folder_path=folder, repo_id="org/flaky")  # the failure was used up
    assert server.repo_files("org/flaky") == read_tree(folder)

    server.fail_next("GET", r"/resolve/.*/config\.json$", status=500, times=2)
    with pytest.raises(HfHubHTTPError):
        hf_hub_download("org/flaky", "config.json", cache_dir=tmp_path / "c1")
    with pytest.raises(HfHubHTTPError):
        hf_hub_download("org/flaky", "config.json", cache_dir=tmp_path / "c2")
    assert Path(hf_hub_download("org/flaky", "config.json", cache_dir=tmp_path / "c3")).exists()

    # A 5xx on the metadata HEAD is retried at once when nothing is cached, so it goes unnoticed...
    server.fail_next("HEAD", r"/resolve/", status=503)
    assert Path(hf_hub_download("org/flaky", "config.json", cache_dir=tmp_path / "c4")).exists()
    # ...while a status the client does not retry surfaces as "cannot find the file".
    server.fail_next("HEAD", r"/resolve/", status=403)
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download("org/flaky", "config.json", cache_dir=tmp_path / "c5")
    statuses = [r.status for r in server.request_log if r.path.endswith("config.json")]
    assert statuses.count(500) == 2 and statuses.count(503) == 1 and statuses.count(403) == 1
