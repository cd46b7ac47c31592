"""The only module that writes generated files: atomically, and never over a hand edit unless forced."""

from __future__ import annotations

import difflib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .files import RenderedFile, body_hash, split_header


class HandEditedError(Exception):
    def __init__(self, paths: list[Path]):
        self.paths = paths
        names = ", ".join(str(p) for p in paths)
        super().__init__(f"generated file(s) edited by hand: {names}; rerun with --force to overwrite")


@dataclass(frozen=True)
class Change:
    path: Path
    old: str | None  # None: the file does not exist yet
    new: str

    @property
    def changed(self) -> bool:
        return self.old != self.new

    def diff(self) -> str:
        old = (self.old or "").splitlines(keepends=True)
        return "".join(difflib.unified_diff(old, self.new.splitlines(keepends=True), f"a/{self.path}", f"b/{self.path}"))


def plan_changes(directory: Path, files: list[RenderedFile]) -> list[Change]:
    changes = []
    for f in files:
        path = directory / f.relative_path
        changes.append(Change(path, path.read_text() if path.exists() else None, f.text))
    return changes


def hand_edited(changes: list[Change]) -> list[Path]:
    edited = []
    for change in changes:
        if change.old is None or not change.changed:
            continue
        recorded, body = split_header(change.old)
        if recorded is None or recorded != body_hash(body):
            edited.append(change.path)
    return edited


def write_atomically(changes: list[Change], force: bool = False) -> list[Path]:
    """Write every changed file, or none: all contents go to temporary files first, then are renamed."""
    edited = hand_edited(changes)
    if edited and not force:
        raise HandEditedError(edited)
    pending = []
    try:
        for change in changes:
            if not change.changed:
                continue
            change.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=change.path.parent, prefix=f".{change.path.name}.", suffix=".tmp")
            with os.fdopen(handle, "w") as out:
                out.write(change.new)
            pending.append((temporary, change.path))
    except BaseException:
        for temporary, _ in pending:
            os.unlink(temporary)
        raise
    for temporary, path in pending:
        os.replace(temporary, path)
    return [path for _, path in pending]
