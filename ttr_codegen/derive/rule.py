"""The derived update rule: what the derivation stage hands to lowering and rendering."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .algebra import MatPoly


class TextEnum(str, Enum):
    """An enumeration whose members equal their text: templates compare and print them as such."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Structure(TextEnum):
    """The structure class of a derived rule: what decides its generated forms."""

    ADDITIVE = "additive"  # S_t = d S_(t-1) + write
    DIAGONAL = "diagonal"  # S_t = Diag(d) S_(t-1) + write
    DELTA = "delta"  # S_t = (d I - r k k^T) S_(t-1) + write
    DIAGONAL_PLUS_RANK_ONE = "diagonal-plus-rank-one"  # S_t = (Diag(d) - r k k^T Diag(d)) S_(t-1) + write
    DELTA_PRODUCT = "delta-product"  # several delta steps per token
    AFFINE = "affine"  # any other linear transition of S
    STACKED_AFFINE = "stacked-affine"  # momentum: (S, Z) together
    SECOND_ORDER = "second-order"  # key moments and a K x K solve
    LOCAL_CONSTANT = "local-constant"  # attention: a weighted value mean per query
    LOCAL_LINEAR = "local-linear"  # attention with a weighted affine fit per query
    LOCAL_POLYNOMIAL = "local-polynomial"
    KERNEL_RIDGE = "kernel-ridge"
    NONLINEAR = "nonlinear"  # an mlp memory trained by mini-batch gradient descent

    @property
    def delta_family(self) -> bool:
        """A transition that removes what the memory recalls for the key: a rank-one term per step."""
        return self in (Structure.DELTA, Structure.DELTA_PRODUCT, Structure.DIAGONAL_PLUS_RANK_ONE)


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
    structure: Structure
    structure_detail: str
    objective_text: str
    objective_latex: str
    equivalences: tuple[str, ...]
    vectors: tuple[tuple[str, str], ...] = ()  # per-key retention vectors: (leaf name, log-gate input)
    scale: float | None = None  # the default query scale; None: K ** -0.5

    @property
    def form(self) -> str:
        """How the generated reference runs: a recurrence over tokens, or attention over the prefix."""
        if self.structure in (Structure.LOCAL_CONSTANT, Structure.LOCAL_LINEAR, Structure.LOCAL_POLYNOMIAL):
            return "attention"
        if self.structure == Structure.KERNEL_RIDGE:
            return "kernel_ridge"
        return "recurrent"

    def state(self, name: str) -> StateVar:
        return next(s for s in self.states if s.name == name)
