"""A small Hugging Face Hub look-alike HTTP server for tests.

The real ``huggingface_hub`` client (not patched, not mocked) talks to this server when
``HF_ENDPOINT`` points at it and Xet is disabled (``HF_HUB_DISABLE_XET=1``): downloads,
repo metadata, safetensors header probing with HTTP ``Range`` requests, and uploads through
the same preupload -> LFS batch -> PUT -> verify -> commit sequence the Hub uses.
Testing against the real client catches protocol mistakes that a mocked client would hide.

Only model repos with ``org/name`` ids are served. Stdlib only: one
``ThreadingHTTPServer`` on ``127.0.0.1`` (random free port) in a daemon thread.

On-disk layout under ``root`` (the server owns it):

* ``root/<org>/<name>/<branch>/...``: the files at the head of each branch, rewritten after
  every commit, for humans and tests to look at (branch names are URL-quoted, so
  ``feature/x`` becomes ``feature%2Fx``). Treat it as read-only.
* ``root/.objects/<sha256>``: content-addressed file contents. Every commit is a mapping
  ``path -> object`` held in memory, so older commits stay downloadable by their sha.

Pointing the client at the server
---------------------------------
``huggingface_hub`` reads its environment once, at import time, into
``huggingface_hub.constants`` (``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET`` ...). A few modules also copy some of these values
(``from ..constants import HF_HUB_CACHE``), and the module-level shortcuts such as
``huggingface_hub.model_info`` are bound methods of an ``HfApi`` built at import time, whose
``endpoint`` was fixed then. Setting environment variables inside a test is therefore not enough.

:func:`hub_env` sets the environment variables (so subprocesses inherit them too), then
executes a private copy of ``constants.py`` under that environment and copies every constant
that changed into the real module with ``monkeypatch.setattr``, together with the copies other
``huggingface_hub`` modules made and the singleton's ``endpoint``. Reading the values from
``constants.py`` itself, instead of a hand-kept list, keeps this right when the client adds
new constants; ``monkeypatch`` restores everything after the test. Running client calls in a
subprocess would also work, but it is slower and makes failures harder to debug.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
import shutil
import sys
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

if TYPE_CHECKING:
    import pytest

_MISSING = object()
Headers = dict[str, str]  # request headers, names lower-cased
Query = dict[str, list[str]]
Json = dict[str, Any]
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class Blob:
    """One file version: ``sha256`` names its object, ``oid`` is its git blob id.

    For LFS files git stores a small pointer file, so ``oid`` is the git id of that pointer,
    as on the Hub; clients identify LFS content by ``sha256`` instead.
    """

    sha256: str
    size: int
    lfs: bool
    oid: str

    @property
    def etag(self) -> str:
        """The Hub's ETag: the sha256 for LFS files, the git blob id otherwise."""
        return self.sha256 if self.lfs else self.oid

    def lfs_json(self, oid_key: str) -> Json:
        """The ``lfs`` object of the Hub's JSON; the sha256 key is named differently per endpoint."""
        return {
            oid_key: self.sha256,
            "size": self.size,
            "pointerSize": len(_lfs_pointer(self.sha256, self.size)),
        }


@dataclass
class _Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> head commit sha
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # sha -> {path: Blob}
    dates: dict[str, str] = field(default_factory=dict)  # sha -> ISO date
    lfs_oids: set[str] = field(default_factory=set)  # LFS objects this repo may reference


@dataclass
class RequestRecord:
    """One received request, with what was answered (for assertions in tests)."""

    method: str
    path: str  # URL-decoded, without the query string
    query: str
    headers: Headers  # lower-cased names
    status: int = 0
    body_bytes: int = 0  # size of the response body (0 for HEAD)


@dataclass
class _Failure:
    method: str
    pattern: re.Pattern[str]
    status: int
    remaining: int


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: Headers = field(default_factory=dict)


class HubError(Exception):
    """An error answered the way the Hub does: the client picks its exception class from
    the ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: Headers | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})

    def response(self) -> _Response:
        headers = {**self.headers, "X-Error-Message": self.message, "Content-Type": "application/json"}
        if self.code:
            headers["X-Error-Code"] = self.code
        return _Response(self.status, json.dumps({"error": self.message}).encode(), headers)


def _json(data: Any, status: int = 200) -> _Response:
    return _Response(status, json.dumps(data).encode(), {"Content-Type": "application/json"})


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(p.startswith(".") for p in parts):
        raise HubError(400, f"This test server needs repo ids like 'org/name', got {repo_id!r}")


class HubServer:
    """Context manager running the server; repos live under ``root`` (see module docstring).

    If ``token`` is set, private repos and every write need ``Authorization: Bearer <token>``
    (otherwise 401), and a wrong token is refused everywhere, as on the Hub. Without a token,
    nothing is checked and ``private`` is only reported in the repo info.

    Files above ``lfs_threshold`` bytes or with an ``LFS_SUFFIXES`` suffix are LFS files: the
    preupload endpoint tells the client to upload them through the LFS protocol, and the tree
    listing reports their ``lfs`` metadata.
    """

    LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")

    def __init__(self, root: Path, token: str | None = None, *, lfs_threshold: int = 1_000_000):
        self.root = Path(root)
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.url = ""
        self.requests: list[tuple[str, str]] = []  # (method, decoded path) of every request
        self.request_log: list[RequestRecord] = []  # same requests, with headers and answers
        self._objects = self.root / ".objects"
        self._repos: dict[str, _Repo] = {}
        self._failures: list[_Failure] = []
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> HubServer:
        self._objects.mkdir(parents=True, exist_ok=True)
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.hub = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        # A short poll interval keeps shutdown() fast; the default (0.5 s) adds up over a test suite.
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- test helpers

    def add_repo(self, repo_id: str, folder: Path, revision: str = "main", private: bool = False) -> str:
        """Commit every file of ``folder`` (except ``.git``) as the whole content of branch
        ``revision``, creating the repo if needed and setting its visibility; returns the new
        commit sha."""
        files: dict[str, Blob] = {}
        for path in sorted(Path(folder).rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and ".git" not in rel.split("/"):
                data = path.read_bytes()
                files[rel] = self._store(data, self._is_lfs(rel, len(data)))
        with self._lock:
            repo = self._repos.get(repo_id) or self._create(repo_id, private)
            repo.private = private
            parent = repo.branches.get(revision, repo.branches["main"])
            return self._commit(repo_id, revision, files, f"Add {revision}", parent)

    def repo_files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Contents of every file of ``repo_id`` at ``revision`` (branch name or commit sha)."""
        with self._lock:
            repo = self._repo(repo_id)
            files = dict(repo.commits[self._resolve_revision(repo, revision)])
        return {path: (self._objects / blob.sha256).read_bytes() for path, blob in files.items()}

    def commit_sha(self, repo_id: str, revision: str = "main") -> str:
        """The commit sha that ``revision`` (a branch, or a sha) points to."""
        with self._lock:
            return self._resolve_revision(self._repo(repo_id), revision)

    def fail_next(self, method: str, path_regex: str, status: int = 500, times: int = 1) -> None:
        """Answer the next ``times`` requests whose method is ``method`` (``"*"`` for any) and
        whose decoded path matches ``path_regex`` (``re.search``) with ``status``.

        The client retries some requests on 429/5xx after a 1 s back-off (e.g. the LFS PUT),
        so one injected 500 there only slows it down; fail several times, or use a status it
        does not retry, to make the client raise.
        """
        with self._lock:
            self._failures.append(_Failure(method.upper(), re.compile(path_regex), status, times))

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()
            self.request_log.clear()

    # ----------------------------------------------------------------- storage

    def _is_lfs(self, path: str, size: int) -> bool:
        return size > 0 and (size > self.lfs_threshold or path.endswith(self.LFS_SUFFIXES))

    def _store(self, data: bytes, lfs: bool) -> Blob:
        sha256 = hashlib.sha256(data).hexdigest()
        target = self._objects / sha256
        if not target.exists():  # content-addressed: an existing object already has these bytes
            tmp = target.with_name(f"{sha256}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        oid = _git_oid(_lfs_pointer(sha256, len(data)) if lfs else data)
        return Blob(sha256, len(data), lfs, oid)

    def _create(self, repo_id: str, private: bool) -> _Repo:
        """Create a repo whose ``main`` branch holds one empty commit, like a new Hub repo."""
        _check_repo_id(repo_id)
        repo = self._repos[repo_id] = _Repo(private=private)
        self._commit(repo_id, "main", {}, "initial commit", parent="")
        return repo

    def _commit(self, repo_id: str, branch: str, files: dict[str, Blob], message: str, parent: str) -> str:
        """Record a commit and move ``branch`` to it.

        The sha is deterministic: it hashes the parent, the message and the files' contents.
        """
        manifest = "".join(
            f"{path}\0{blob.sha256}\0{int(blob.lfs)}\n" for path, blob in sorted(files.items())
        )
        sha = hashlib.sha1(f"{parent}\n{message}\n{manifest}".encode()).hexdigest()
        repo = self._repos[repo_id]
        repo.commits[sha] = dict(files)
        repo.dates.setdefault(sha, _now())
        repo.lfs_oids.update(blob.sha256 for blob in files.values() if blob.lfs)
        self._set_branch(repo_id, branch, sha)
        return sha

    def _set_branch(self, repo_id: str, branch: str, sha: str) -> None:
        """Point ``branch`` at commit ``sha`` and rewrite the branch's folder on disk."""
        repo = self._repos[repo_id]
        repo.branches[branch] = sha
        folder = self.root / repo_id / quote(branch, safe="")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for path, blob in repo.commits[sha].items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self._objects / blob.sha256, folder / path)

    def _repo(self, repo_id: str) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _resolve_revision(self, repo: _Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if _COMMIT_SHA.fullmatch(revision) and revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # ----------------------------------------------------------------- auth

    def _check_auth(self, headers: Headers, repo: _Repo | None, write: bool) -> None:
        """401s as the Hub sends them: a private repo looks missing (``RepoNotFound``) to
        anonymous callers; the client maps an invalid token to a plain ``HfHubHTTPError``."""
        if self.token is None:
            return
        auth = headers.get("authorization")
        if auth is not None and auth != f"Bearer {self.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        if auth is None and write:
            raise HubError(401, "Invalid username or password.")
        if auth is None and repo is not None and repo.private:
            raise HubError(401, "Repository not found", "RepoNotFound")

    def _readable(self, repo_id: str, revision: str, headers: Headers) -> tuple[_Repo, str, dict[str, Blob]]:
        with self._lock:
            repo = self._repo(repo_id)
            self._check_auth(headers, repo, write=False)
            sha = self._resolve_revision(repo, revision)
            return repo, sha, repo.commits[sha]

    def _writable(self, repo_id: str, headers: Headers) -> _Repo:
        with self._lock:
            self._check_auth(headers, None, write=True)
            return self._repo(repo_id)

    # ----------------------------------------------------------------- request handling

    def _handle(self, handler: _Handler) -> None:
        method = handler.command
        url = urlsplit(handler.path)
        path = unquote(url.path)
        headers = {name.lower(): value for name, value in handler.headers.items()}
        body = handler.read_body()
        record = RequestRecord(method, path, url.query, headers)
        with self._lock:
            self.requests.append((method, path))
            self.request_log.append(record)
            failure = self._take_failure(method, path)
        try:
            if failure is not None:
                raise HubError(failure.status, f"Simulated failure for {method} {path}")
            # Split before decoding: clients encode '/' inside revisions and paths as %2F.
            segments = [unquote(s) for s in url.path.split("/")[1:]]
            response = self._route(method, segments, parse_qs(url.query), headers, body)
        except HubError as error:
            response = error.response()
        except Exception:  # a server bug: surface it to the test instead of hanging the client
            response = HubError(500, traceback.format_exc()).response()
        # Filled in before sending: the client may act on the answer before send() returns.
        record.status = response.status
        record.body_bytes = 0 if method == "HEAD" else len(response.body)
        handler.send(response, head_only=method == "HEAD")

    def _take_failure(self, method: str, path: str) -> _Failure | None:
        for failure in self._failures:
            if failure.method in ("*", method) and failure.pattern.search(path):
                failure.remaining -= 1
                if failure.remaining <= 0:
                    self._failures.remove(failure)
                return failure
        return None

    def _route(self, method: str, seg: list[str], query: Query, headers: Headers, body: bytes) -> _Response:
        read = method in ("GET", "HEAD")
        match seg:
            case ["api", "models", org, name] if read:
                return self._repo_info(f"{org}/{name}", "main", query, headers)
            case ["api", "models", org, name, "revision", *rev] if read and rev:
                return self._repo_info(f"{org}/{name}", "/".join(rev), query, headers)
            case ["api", "models", org, name, "tree", rev, *path] if read:
                return self._tree(f"{org}/{name}", rev, "/".join(path).strip("/"), query, headers)
            case ["api", "models", org, name, "refs"] if read:
                return self._refs(f"{org}/{name}", headers)
            case ["api", "repos", "create"] if method == "POST":
                return self._create_repo(json.loads(body), headers)
            case ["api", "models", org, name, "branch", *branch] if method == "POST" and branch:
                return self._create_branch(
                    f"{org}/{name}", "/".join(branch), json.loads(body or b"{}"), headers
                )
            case ["api", "models", org, name, "preupload", *rev] if method == "POST" and rev:
                return self._preupload(f"{org}/{name}", "/".join(rev), json.loads(body), headers)
            case ["api", "models", org, name, "commit", *rev] if method == "POST" and rev:
                return self._commit_endpoint(f"{org}/{name}", "/".join(rev), query, body, headers)
            case ["api", "validate-yaml"] if method == "POST":
                return _json({"errors": [], "warnings": []})
            case [org, git_name, "info", "lfs", "objects", "batch"] if method == "POST":
                return self._lfs_batch(f"{org}/{git_name.removesuffix('.git')}", json.loads(body), headers)
            case [org, git_name, "info", "lfs", "objects", "verify"] if method == "POST":
                return self._lfs_verify(f"{org}/{git_name.removesuffix('.git')}", json.loads(body), headers)
            case ["_lfs", org, name, oid] if method == "PUT":
                return self._lfs_put(f"{org}/{name}", oid, body)
            case [org, name, "resolve", rev, *path] if read and path:
                return self._resolve_file(f"{org}/{name}", rev, "/".join(path), headers)
        raise HubError(404, f"No route for {method} /{'/'.join(seg)} on this test server")

    # ----------------------------------------------------------------- read endpoints

    def _repo_info(self, repo_id: str, revision: str, query: Query, headers: Headers) -> _Response:
        repo, sha, files = self._readable(repo_id, revision, headers)
        with_blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, blob in sorted(files.items()):
            sibling: Json = {"rfilename": path}
            if with_blobs:
                sibling.update(size=blob.size, blobId=blob.oid)
                if blob.lfs:
                    sibling["lfs"] = blob.lfs_json("sha256")
            siblings.append(sibling)
        org = repo_id.split("/")[0]
        first_date = min(repo.dates.values())
        return _json({
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": org, "sha": sha, "lastModified": repo.dates[sha], "createdAt": first_date,
            "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "tags": [], "siblings": siblings, "usedStorage": sum(b.size for b in files.values()),
        })  # fmt: skip

    def _tree(self, repo_id: str, revision: str, prefix: str, query: Query, headers: Headers) -> _Response:
        """All entries are returned in one page, so the client never follows a ``Link`` header."""
        _, _, files = self._readable(repo_id, revision, headers)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        base = f"{prefix}/" if prefix else ""
        below = {path: blob for path, blob in files.items() if path.startswith(base)}
        if prefix and not below:
            raise HubError(404, f"{prefix} does not exist on {revision}", "EntryNotFound")
        folders: set[str] = set()
        entries: list[Json] = []
        for path, blob in sorted(below.items()):
            parts = path[len(base) :].split("/")
            # Every folder between `prefix` and the file, or only the first one if not recursive.
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folders.add(base + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entry: Json = {"type": "file", "oid": blob.oid, "size": blob.size, "path": path}
                if blob.lfs:
                    entry["lfs"] = blob.lfs_json("oid")
                entries.append(entry)
        for folder in sorted(folders):
            content = [f"{p}:{b.oid}" for p, b in sorted(files.items()) if p.startswith(folder + "/")]
            oid = hashlib.sha1("\n".join(content).encode()).hexdigest()
            entries.append({"type": "directory", "oid": oid, "size": 0, "path": folder})
        return _json(sorted(entries, key=lambda e: e["path"]))

    def _refs(self, repo_id: str, headers: Headers) -> _Response:
        with self._lock:
            repo = self._repo(repo_id)
            self._check_auth(headers, repo, write=False)
            heads = sorted(repo.branches.items())
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in heads]
        return _json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _resolve_file(self, repo_id: str, revision: str, path: str, headers: Headers) -> _Response:
        """Serve a file directly (no redirect), with the headers ``hf_hub_download`` needs.

        On the Hub, LFS files answer with a redirect to a CDN carrying ``X-Linked-Etag`` and
        ``X-Linked-Size``; the client prefers those over ``ETag``/``Content-Length``, so they
        are sent here too even though no redirect happens.
        """
        _, sha, files = self._readable(repo_id, revision, headers)
        blob = files.get(path)
        if blob is None:  # X-Repo-Commit lets the client cache the file's absence
            raise HubError(
                404, f"{path} does not exist on {revision}", "EntryNotFound", {"X-Repo-Commit": sha}
            )
        response_headers = {
            "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
            "ETag": f'"{blob.etag}"', "X-Repo-Commit": sha,
        }  # fmt: skip
        if blob.lfs:
            response_headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        start, end = 0, blob.size
        range_match = _RANGE.fullmatch(headers.get("range", "").strip())
        # No Range header, a malformed one or a multi-range one: serve the whole file.
        if range_match and (range_match[1] or range_match[2]):
            first, last = range_match[1], range_match[2]
            if first:
                start, end = int(first), min(int(last) + 1, blob.size) if last else blob.size
            else:  # "bytes=-N": the last N bytes
                start = max(blob.size - int(last), 0)
            if start >= end:
                raise HubError(
                    416, "Range not satisfiable", headers={"Content-Range": f"bytes */{blob.size}"}
                )
            response_headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        with (self._objects / blob.sha256).open("rb") as file:
            file.seek(start)
            data = file.read(end - start)
        return _Response(206 if "Content-Range" in response_headers else 200, data, response_headers)

    # ----------------------------------------------------------------- write endpoints

    def _create_repo(self, payload: Json, headers: Headers) -> _Response:
        if payload.get("type", "model") != "model":
            raise HubError(400, "This test server only hosts model repos")
        repo_id = f"{payload.get('organization') or ''}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self._lock:
            self._check_auth(headers, None, write=True)
            if repo_id in self._repos:
                return _json(
                    {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, 409
                )
            self._create(repo_id, private)
        return _json({"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _create_branch(self, repo_id: str, branch: str, payload: Json, headers: Headers) -> _Response:
        with self._lock:
            repo = self._writable(repo_id, headers)
            if branch.startswith("refs/") or _COMMIT_SHA.fullmatch(branch):
                raise HubError(400, f"Invalid reference for a branch: {branch}")
            if branch in repo.branches:
                raise HubError(409, f"Reference {branch} already exists")
            sha = self._resolve_revision(repo, payload.get("startingPoint") or "main")
            self._set_branch(repo_id, branch, sha)
        return _json({})

    def _preupload(self, repo_id: str, revision: str, payload: Json, headers: Headers) -> _Response:
        """Tell the client, per file, whether to send it inline ("regular") or through LFS.

        ``oid`` is the current remote id of the file (sha256 for LFS, git blob id otherwise):
        the client compares it with its own and drops unchanged files from the commit.
        """
        with self._lock:
            repo = self._writable(repo_id, headers)
            current = repo.commits[self._resolve_revision(repo, revision)]
        answers = []
        for file in payload["files"]:
            lfs = self._is_lfs(file["path"], file["size"])
            blob = current.get(file["path"])
            oid = None if blob is None else (blob.sha256 if blob.lfs else blob.oid)
            mode = "lfs" if lfs else "regular"
            answers.append({"path": file["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return _json({"files": answers})

    def _commit_endpoint(
        self, repo_id: str, branch: str, query: Query, body: bytes, headers: Headers
    ) -> _Response:
        """Apply an NDJSON commit: a ``header`` line, then ``file`` (inline base64),
        ``lfsFile`` (an already uploaded LFS object), ``deletedFile`` or ``deletedFolder`` lines."""
        if query.get("create_pr", ["0"])[0] not in ("0", "false"):
            raise HubError(400, "Pull requests are not supported by this test server")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        with self._lock:  # held throughout, so concurrent commits to a branch cannot interleave
            repo = self._writable(repo_id, headers)
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo.branches[branch]
            if header.get("parentCommit") not in (None, head):
                raise HubError(412, f"Parent commit {header['parentCommit']} is not the head of {branch}")
            files = dict(repo.commits[head])
            for line in lines[1:]:
                key, path = line["key"], line["value"]["path"]
                if path.startswith("/") or ".." in path.split("/"):  # branch folders are written to disk
                    raise HubError(400, f"Invalid path in repo: {path!r}")
                if key == "file":
                    files[path] = self._store(base64.b64decode(line["value"]["content"]), lfs=False)
                elif key == "lfsFile":
                    oid = line["value"]["oid"]
                    if oid not in repo.lfs_oids:
                        raise HubError(422, f"LFS object {oid} for {path} was never uploaded")
                    size = (self._objects / oid).stat().st_size
                    files[path] = Blob(oid, size, True, _git_oid(_lfs_pointer(oid, size)))
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    files = {p: b for p, b in files.items() if not p.startswith(path.rstrip("/") + "/")}
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            message = "\n\n".join(filter(None, [header.get("summary"), header.get("description")]))
            sha = self._commit(repo_id, branch, files, message, head)
        commit_url = f"{self.url}/{repo_id}/commit/{sha}"
        return _json({"success": True, "commitOid": sha, "commitUrl": commit_url, "pullRequestUrl": None})

    def _lfs_batch(self, repo_id: str, payload: Json, headers: Headers) -> _Response:
        """Git LFS batch API: objects the repo already has get no ``actions`` (nothing to send);
        the others get a PUT ``upload`` URL and a ``verify`` URL. The upload URL stands in for
        the Hub's pre-signed storage URL, so the PUT itself carries no token."""
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the LFS 'upload' operation is supported")
        with self._lock:
            known = set(self._writable(repo_id, headers).lfs_oids)
        objects = []
        for obj in payload["objects"]:
            entry: Json = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in known:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/_lfs/{repo_id}/{obj['oid']}"},
                    "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return _json({"transfer": "basic", "objects": objects})

    def _lfs_put(self, repo_id: str, oid: str, body: bytes) -> _Response:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match its sha256 {oid}")
        self._store(body, lfs=True)
        with self._lock:
            self._repo(repo_id).lfs_oids.add(oid)
        return _Response(200, b"", {"ETag": f'"{oid}"'})

    def _lfs_verify(self, repo_id: str, payload: Json, headers: Headers) -> _Response:
        oid, size = payload["oid"], payload["size"]
        with self._lock:
            known = oid in self._writable(repo_id, headers).lfs_oids
        if not known or (self._objects / oid).stat().st_size != size:
            raise HubError(404, f"LFS object {oid} (size {size}) not found")
        return _json({"success": True})


class _Handler(BaseHTTPRequestHandler):
    """Forwards every request to the owning :class:`HubServer`; speaks keep-alive HTTP/1.1
    like the Hub, so every response carries a Content-Length."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (name imposed by BaseHTTPRequestHandler)
        self.server.hub._handle(self)  # type: ignore[attr-defined]

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET  # noqa: N815

    def read_body(self) -> bytes:
        """The request body; file uploads may arrive with chunked transfer encoding."""
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # CRLF after each chunk
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # optional trailers
            pass
        return b"".join(chunks)

    def send(self, response: _Response, head_only: bool) -> None:
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silence the per-request stderr lines; tests read ``HubServer.request_log`` instead."""


# --------------------------------------------------------------------- client setup


# Variables that would leak the developer's setup (token, cache, offline mode) into a test.
_AMBIENT_ENV = [
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "TRANSFORMERS_OFFLINE",
    "HUGGINGFACE_CO_STAGING",
    "HF_HUB_ENABLE_HF_TRANSFER",
]


def hub_env(
    server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *, offline: bool = False
) -> Path:
    """Point the real ``huggingface_hub`` client at ``server`` for the current test.

    Sets the environment (endpoint, Xet off, telemetry and progress bars off, ``HF_HOME``
    under ``tmp_path``, no ambient token) and refreshes the client's import-time constants
    (see the module docstring). Call it again with ``offline=True`` (same ``tmp_path``) to
    switch the client to ``HF_HUB_OFFLINE`` mode on the same cache. Everything is undone by
    ``monkeypatch`` at the end of the test. Returns the hub cache folder (``HF_HUB_CACHE``).
    """
    hf_home = tmp_path / "hf_home"
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in _AMBIENT_ENV:
        monkeypatch.delenv(name, raising=False)
    _refresh_client_constants(monkeypatch, server.url)
    return hf_home / "hub"


def _refresh_client_constants(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    import huggingface_hub.constants as constants
    from huggingface_hub import hf_api

    # Run a private copy of constants.py under the current environment.
    spec = importlib.util.spec_from_file_location("_hub_server_fresh_constants", constants.__file__)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)

    modules = [
        m for name, m in list(sys.modules.items()) if name.startswith("huggingface_hub.") and m is not None
    ]
    for name, new in vars(fresh).items():
        old = getattr(constants, name, None)
        if not name.isupper() or new == old:
            continue
        # Modules that did `from ..constants import NAME` hold the very same object: patch them too.
        for module in modules:
            if module is not constants and getattr(module, name, _MISSING) is old:
                monkeypatch.setattr(module, name, new)
        monkeypatch.setattr(constants, name, new)

    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)  # behind huggingface_hub.model_info & co.
    from huggingface_hub.utils import _http

    if hasattr(_http, "_url_origin") and hasattr(_http, "_HUB_ORIGINS"):  # origins allowed to get the token
        monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(endpoint)})
