"""Output folders: written aside, moved into place only when complete, and claimed by one run at a time.

A crash, Ctrl-C or bad input never leaves a half-written folder where the output should be, and never
touches what was there. Two runs on the same output (a command started again while the first is still
going, to "resume" it) would write one staging folder at once, or one would delete the other's work
(``--force`` with other settings): the second is refused while the first holds the output's lock.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import TextIO

from .errors import BadInputError, MoeConvertError, NotEnoughSpaceError, OutputExistsError
from .units import size_text

try:  # POSIX; elsewhere runs on one output are not kept apart
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


class OutputFolder:
    """A staging folder that becomes ``final`` only when the work inside it has completed.

    With ``needs_bytes`` (what the run will have written when it ends, at its peak on disk), a run that
    cannot fit is refused before any work: found out at the end of hours of quantization, a full disk
    costs those hours (the finished layers are kept, but nothing can go on until space is freed).

    Work happens in a hidden sibling ``.<name>.partial``; on success it is renamed into place (an old
    output, allowed by ``force``, is moved aside first and deleted last). Whatever was at ``final`` is
    untouched until then. On failure the staging folder is removed, except for a ``resumable`` run
    stopped by something other than bad input (Ctrl-C, a full disk, a crash): its finished work stays
    for the same command to pick up, and a later start reuses it unless ``force`` is given.

    From :meth:`lock` (or entering) to leaving, the run holds ``.<name>.lock`` beside the output, and
    another run on the same output is refused. The kernel drops the lock with the process, so a run
    killed with SIGKILL leaves only an empty file, which the next run takes over.
    """

    def __init__(
        self,
        final: Path,
        force: bool = False,
        resumable: bool = False,
        source: Path | None = None,
        needs_bytes: int = 0,
    ) -> None:
        self.final = Path(final)
        self.needs_bytes = needs_bytes
        if self.final.name in ("", ".."):  # "." or "..": the folder it stands for, by name
            self.final = Path(os.path.abspath(self.final))
        if not self.final.name:
            raise BadInputError("the output cannot be the root folder: give a folder to create")
        self.force = force
        self.resumable = resumable
        self.source = source
        self.staging = self.final.with_name(f".{self.final.name}.partial")
        self.lock_path = self.final.with_name(f".{self.final.name}.lock")
        self._lock: TextIO | None = None

    def __enter__(self) -> Path:
        try:
            return self._enter()
        except BaseException:
            self.unlock()
            raise

    def _enter(self) -> Path:
        self.check_apart()
        if self.final.is_symlink():  # replacing moves the link, not the folder it names
            raise OutputExistsError(f"output {self.final} is a symbolic link: give the folder it points to")
        if self.final.exists() and not self.force:
            raise OutputExistsError(f"output {self.final} already exists (use --force to replace it)")
        if self.final.exists() and not self.final.is_dir():
            raise OutputExistsError(f"output {self.final} exists and is not a folder")
        self.lock()
        try:
            if self.staging.exists() and not self.resumable:  # a resumable run's caller decides
                shutil.rmtree(self.staging)
            self.check_room()
            self.staging.mkdir(exist_ok=True)
        except OSError as err:  # before any work: bad input, not a failed write
            raise BadInputError(
                f"cannot create the output folder {self.final}: {_unmakeable(self.final, err)}"
            ) from None
        return self.staging

    def lock(self) -> None:
        """Claim the output for this run (again: nothing to do), creating the folder it goes in. Call it
        before reading or deleting a partial output that another run could be writing."""
        if self._lock is not None:
            return
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            handle = self.lock_path.open("a")
        except OSError as err:
            raise BadInputError(
                f"cannot create the output folder {self.final}: {_unmakeable(self.final, err)}"
            ) from None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise OutputExistsError(
                    f"another run is writing {self.final} now: wait for it to end, or stop it and run "
                    "this again"
                ) from None
        self._lock = handle

    def unlock(self) -> None:
        """Give the output up (after success or failure alike)."""
        if self._lock is None:
            return
        self.lock_path.unlink(missing_ok=True)
        self._lock.close()
        self._lock = None

    def check_room(self) -> None:
        """Refuse a run whose output will not fit in the free space where it goes. What a stopped run
        has already written to the staging folder counts as written; an output that ``force`` replaces
        still takes its space until the new one is complete."""
        if not self.needs_bytes:
            return
        written = (
            sum(p.stat().st_size for p in self.staging.rglob("*") if p.is_file())
            if self.staging.exists()
            else 0
        )
        missing, free = self.needs_bytes - written, shutil.disk_usage(self.final.parent).free
        if missing > free:
            raise NotEnoughSpaceError(
                f"not enough disk space for {self.final}: the run writes about {size_text(missing)} and "
                f"{self.final.parent} has {size_text(free)} free; free space or give an output on another disk"
            )

    def check_apart(self) -> None:
        """Refuse an output that is the input folder, holds it or lies inside it: replacing it (with
        ``force``) would delete the input, and the input is never written to."""
        if self.source is None:
            return
        final, source = self.final.resolve(), Path(self.source).resolve()
        if final == source or final in source.parents or source in final.parents:
            raise BadInputError(
                f"output {self.final} overlaps the input {self.source}: write to a folder outside it"
            )

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is not None:
                if not self.resumable or issubclass(exc_type, MoeConvertError):
                    shutil.rmtree(self.staging, ignore_errors=True)
                return
            old = self.final.with_name(f".{self.final.name}.old")
            if self.final.exists():
                if old.exists():
                    shutil.rmtree(old)
                os.replace(self.final, old)
            os.replace(self.staging, self.final)
            if old.exists():
                shutil.rmtree(old)
        finally:
            self.unlock()


def _unmakeable(folder: Path, err: OSError) -> str:
    """Why ``folder`` cannot be made: a file where a folder of its path should be, else the OS's reason."""
    for parent in folder.parents:
        if parent.exists():
            return f"{parent} is not a folder" if not parent.is_dir() else str(err.strerror or err)
    return str(err.strerror or err)
