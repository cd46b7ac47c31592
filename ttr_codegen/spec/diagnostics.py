"""Compiler-style diagnostics: every problem of a spec file, reported at once."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Position:
    line: int  # 1-based
    column: int  # 1-based


@dataclass(frozen=True)
class Diagnostic:
    path: str
    position: Position
    field: str
    message: str
    hint: str

    def format(self) -> str:
        where = f"{self.path}:{self.position.line}:{self.position.column}"
        text = f"{where}: error: {self.field}: {self.message}" if self.field else f"{where}: error: {self.message}"
        return f"{text}\n  help: {self.hint}" if self.hint else text


@dataclass
class SpecError(Exception):
    """Raised with all diagnostics of one spec file."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def __str__(self) -> str:
        count = len(self.diagnostics)
        lines = [d.format() for d in self.diagnostics]
        lines.append(f"{count} error{'s' if count != 1 else ''} found")
        return "\n".join(lines)
