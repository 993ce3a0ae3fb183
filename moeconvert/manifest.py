"""The sha256 manifest of an output folder, and ``check``: is this folder exactly what was written?

Every output carries ``SHA256SUMS``, one ``<sha256>  <file>`` line per file, in the format ``sha256sum``
writes, so users can also check a folder with ``sha256sum -c SHA256SUMS`` and no moeconvert at hand. It is
written last, after everything else is complete: a folder without it, or whose files differ from it, is
not a finished output. Shards hashed while they were written are not read again.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInputError

MANIFEST_NAME = "SHA256SUMS"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def listed_files(folder: Path) -> list[str]:
    """Files a manifest covers: everything but itself and hidden staging files, as sorted relative paths."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file()
        and p.name != MANIFEST_NAME
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def write_manifest(folder: Path, known: dict[str, str] | None = None) -> Path:
    """Hash every file of ``folder`` (reusing ``known`` digests, e.g. computed while writing) into its manifest."""
    known = known or {}
    digests = {name: known.get(name) or file_sha256(folder / name) for name in listed_files(folder)}
    return _write(folder, digests)


def update_manifest(folder: Path, names: list[str]) -> None:
    """Re-hash ``names`` after they were rewritten (model card, parity report); other entries stay."""
    path = folder / MANIFEST_NAME
    if not path.exists():
        return
    digests = read_manifest(folder)
    digests.update({name: file_sha256(folder / name) for name in names if (folder / name).is_file()})
    _write(folder, digests)


def read_manifest(folder: Path) -> dict[str, str]:
    path = folder / MANIFEST_NAME
    digests = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise BadInputError(f"{path}:{number}: not a '<sha256>  <file>' line")
        digests[name] = digest
    return digests


def _write(folder: Path, digests: dict[str, str]) -> Path:
    path = folder / MANIFEST_NAME
    staged = folder / f".{MANIFEST_NAME}.tmp"
    with staged.open("w") as file:
        file.writelines(f"{digest}  {name}\n" for name, digest in sorted(digests.items()))
        file.flush()
        os.fsync(file.fileno())
    os.replace(staged, path)
    return path


@dataclass
class CheckReport:
    folder: str
    files: int = 0
    bytes: int = 0
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not (self.missing or self.changed or self.unexpected)

    def problems(self) -> str:
        parts = [
            f"{label}: {', '.join(names)}"
            for label, names in (
                ("missing", self.missing),
                ("changed", self.changed),
                ("unexpected", self.unexpected),
            )
            if names
        ]
        return "; ".join(parts)


def check(folder: str | Path, progress: bool = False) -> CheckReport:
    """Re-hash every file ``folder``'s manifest lists; a missing, truncated, altered or extra file fails.

    Raises:
        BadInputError: no such folder, or no manifest (an unfinished or foreign folder).
    """
    from .progress import progress_bar

    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(f"{folder}: no such folder")
    if not (folder / MANIFEST_NAME).is_file():
        raise BadInputError(f"{folder} has no {MANIFEST_NAME}: not a finished moeconvert output")
    expected = read_manifest(folder)
    report = CheckReport(str(folder), files=len(expected))
    present = set(listed_files(folder))
    report.unexpected = sorted(present - set(expected))
    total = sum((folder / n).stat().st_size for n in expected if n in present)
    with progress_bar(total=total, unit="B", unit_scale=True, desc="check", show=progress) as bar:
        for name, digest in sorted(expected.items()):
            if name not in present:
                report.missing.append(name)
                continue
            size = (folder / name).stat().st_size
            if file_sha256(folder / name) != digest:
                report.changed.append(name)
            report.bytes += size
            bar.update(size)
    return report
