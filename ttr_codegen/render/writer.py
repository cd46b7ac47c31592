"""The only module that writes generated files: atomically, and never over a hand edit unless forced."""

from __future__ import annotations

import difflib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .files import RenderedFile, body_hash, recorded_spec_path, split_header


class HandEditedError(Exception):
    def __init__(self, paths: list[Path]):
        self.paths = paths
        names = ", ".join(str(p) for p in paths)
        super().__init__(f"generated file(s) edited by hand: {names}; rerun with --force to overwrite")


class PackageOwnedError(Exception):
    """A package folder that another spec generated (two specs with one name)."""


@dataclass(frozen=True)
class Change:
    path: Path
    old: str | None  # None: the file does not exist yet
    new: str | None  # None: the file goes (a stale file of the package)

    @property
    def changed(self) -> bool:
        return self.old != self.new

    def diff(self) -> str:
        if self.new is None:
            return f"extra: {self.path} (not generated from the spec any more; `ttr generate` removes it)\n"
        old = (self.old or "").splitlines(keepends=True)
        return "".join(difflib.unified_diff(old, self.new.splitlines(keepends=True), f"a/{self.path}", f"b/{self.path}"))


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        return ""  # a binary file: never generated, so edited by hand


def plan_changes(directory: Path, files: list[RenderedFile]) -> list[Change]:
    changes = []
    for f in files:
        path = directory / f.relative_path
        changes.append(Change(path, _read(path) if path.is_file() else None, f.text))
    return changes


def plan_package(directory: Path, files: list[RenderedFile], spec_path: str, force: bool = False) -> list[Change]:
    """The changes that make `directory` hold exactly the package's files: the generator owns the folder, so
    files it no longer generates (and leftovers of an interrupted run) go. A folder that another spec generated
    is refused unless forced."""
    changes = plan_changes(directory, files)
    if not directory.is_dir():
        return changes
    owner = generated_from(directory)
    if owner is not None and owner != spec_path and not force:
        raise PackageOwnedError(f"{directory} was generated from {owner}, not {spec_path}; "
                                "rename the layer, or rerun with --force to replace it")
    planned = {directory / f.relative_path for f in files}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path not in planned:
            changes.append(Change(path, _read(path), None))
    return changes


def generated_from(directory: Path) -> str | None:
    """The spec path recorded in a generated package's __init__.py header, if any."""
    init = directory / "__init__.py"
    return recorded_spec_path(_read(init)) if init.is_file() else None


def hand_edited(changes: list[Change]) -> list[Path]:
    edited = []
    for change in changes:
        if change.old is None or not change.changed:
            continue
        if change.new is None and change.path.name.endswith(".tmp"):
            continue  # a leftover of an interrupted run
        recorded, body = split_header(change.old)
        if recorded is None or recorded != body_hash(body):
            edited.append(change.path)
    return edited


def _file_mode() -> int:
    """What a plain `open(path, "w")` would create under the current umask (mkstemp makes files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(changes: list[Change], force: bool = False) -> list[Path]:
    """Write every changed file, or none: all contents go to temporary files first, then are renamed; stale
    files are removed last."""
    edited = hand_edited(changes)
    if edited and not force:
        raise HandEditedError(edited)
    pending = []
    mode = _file_mode()
    try:
        for change in changes:
            if not change.changed or change.new is None:
                continue
            change.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=change.path.parent, prefix=f".{change.path.name}.", suffix=".tmp")
            pending.append((temporary, change.path))
            with os.fdopen(handle, "w") as out:
                out.write(change.new)
            os.chmod(temporary, mode)
    except BaseException:
        for temporary, _ in pending:
            os.unlink(temporary)
        raise
    for temporary, path in pending:
        os.replace(temporary, path)
    removed = [change.path for change in changes if change.new is None]
    for path in removed:
        path.unlink()
    return [path for _, path in pending] + removed
