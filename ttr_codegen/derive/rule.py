"""The derived update rule: what the derivation stage hands to lowering and rendering."""

from __future__ import annotations

from dataclasses import dataclass

from .algebra import MatPoly


@dataclass(frozen=True)
class StateVar:
    name: str
    rows: str  # "K" or "V"
    cols: str  # "K", "V" or "1"
    meaning: str
    init: str = "zeros"  # "zeros" or "identity_over_ridge"

    @property
    def shape_text(self) -> str:
        dims = ["B", "H"] + [d for d in (self.rows, self.cols) if d != "1"]
        return "[" + ", ".join(dims) + "]"


@dataclass(frozen=True)
class Assign:
    target: str
    value: MatPoly


@dataclass(frozen=True)
class UpdateRule:
    name: str
    states: tuple[StateVar, ...]
    update: tuple[Assign, ...]  # per token, or per sub-step when substeps > 1
    substeps: int
    readout: tuple[Assign, ...]  # the last one assigns "o"
    structure: str
    structure_detail: str
    objective_text: str
    objective_latex: str
    equivalences: tuple[str, ...]
    vectors: tuple[tuple[str, str], ...] = ()  # per-key retention vectors: (leaf name, log-gate input)
    scale: float | None = None  # the default query scale; None: K ** -0.5

    @property
    def form(self) -> str:
        """How the generated reference runs: a recurrence over tokens, or attention over the prefix."""
        if self.structure in ("local-constant", "local-linear", "local-polynomial"):
            return "attention"
        if self.structure == "kernel-ridge":
            return "kernel_ridge"
        return "recurrent"

    def state(self, name: str) -> StateVar:
        return next(s for s in self.states if s.name == name)
