"""Upload a converted folder to the Hugging Face Hub with ``huggingface_hub``.

The upload is one commit made by ``HfApi.upload_folder``: large files go through the Hub's LFS storage
first and the commit only lands once every file is there, so a failed upload never leaves a half-updated
repo. Rerunning after a failure sends again only what the Hub does not already hold (the client asks
before uploading each large file). The token comes from ``token``, ``HF_TOKEN`` or the saved login and is
handed to the client only: it is never printed, logged or written into the folder.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub import errors as hub_errors

from .card import CARD_NAME, REPORT_NAME, write_card
from .errors import BadInputError, CheckFailedError, PushFailedError
from .manifest import update_manifest
from .source import HUB_ID_RE, UNREACHABLE_ERRORS, first_line
from .verify import report_path

# Never uploaded: staging files of an interrupted write and the client's own bookkeeping.
IGNORED = [".*", ".*/**", "**/.*"]


@dataclass
class PushResult:
    repo_id: str
    branch: str
    commit_url: str
    files: int
    bytes: int


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    allow_failed: bool = False,
) -> PushResult:
    """Create ``repo_id`` if needed (private when asked) and make ``branch`` (default: main) hold exactly
    the files of ``folder``, in one commit (a new branch starts from main; ``.gitattributes`` is kept).

    A quantized folder's model card is rewritten first so its loading examples name ``repo_id``. A
    folder whose stored parity report failed is not published unless ``allow_failed`` (its card says
    it failed), as ``quantize --push-to-hub`` pushes nothing that failed its check.

    Raises:
        BadInputError: the folder is not a finished checkpoint, or ``repo_id`` is not ``org/name``.
        CheckFailedError: the folder's stored parity report failed, and ``allow_failed`` is false.
        PushFailedError: the Hub refused or the connection failed; the local folder is left as it was.
    """
    folder = Path(folder)
    _check_folder(folder)
    if not HUB_ID_RE.match(repo_id):
        raise BadInputError(f"{repo_id!r} is not a Hub repository id of the form org/name")
    if not allow_failed:
        _check_parity(folder)
    if (folder / REPORT_NAME).exists():
        write_card(folder, repo_id, branch)
        update_manifest(folder, [CARD_NAME])
    files = [p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder))]
    api = HfApi(token=token)
    message = commit_message or f"Upload {folder.name} with moeconvert"
    with _push_errors(folder, repo_id, branch):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        commit = api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            revision=branch,
            commit_message=message,
            ignore_patterns=IGNORED,
            delete_patterns="*",  # stale files (e.g. another shard count) go in the same commit
        )
    return PushResult(
        repo_id, branch or "main", commit.commit_url, len(files), sum(p.stat().st_size for p in files)
    )


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise BadInputError(f"{folder}: no such folder")
    if folder.name.startswith(".") and folder.name.endswith(".partial"):
        raise BadInputError(f"{folder} is an unfinished output; finish the run before pushing it")
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise BadInputError(f"{folder} holds no config.json and safetensors weights; nothing to push")


def _check_parity(folder: Path) -> None:
    path = report_path(folder)
    parity = json.loads(path.read_text()) if path.is_file() else {}
    if parity.get("passed") is False:
        raise CheckFailedError(
            f"{folder} failed its parity check ({'; '.join(parity.get('failures', []))}); nothing was pushed: "
            "add --allow-failed to publish it anyway, with a card that says it failed"
        )


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


@contextlib.contextmanager
def _push_errors(folder: Path, repo_id: str, branch: str | None) -> Iterator[None]:
    """Turn the client's exceptions into one line that says the local folder is intact and what to rerun."""
    rerun = f"moeconvert push {folder} {repo_id}" + (f" --branch {branch}" if branch else "")
    tail = f"the local output {folder} is intact; rerun `{rerun}` to finish"
    try:
        yield
    except hub_errors.HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise PushFailedError(
                f"the Hub wants a valid token (401): log in with `hf auth login` or set HF_TOKEN; {tail}"
            ) from None
        if status == 403:
            raise PushFailedError(f"no write access to {repo_id} (403); {tail}") from None
        raise PushFailedError(f"upload failed: the Hub answered {first_line(err)}; {tail}") from None
    except UNREACHABLE_ERRORS as err:
        raise PushFailedError(f"upload failed: {first_line(err)}; {tail}") from None
