"""Stage 2: `Spec` -> `UpdateRule` (SymPy)."""

from .derivation import DerivationError, derive
from .rule import Assign, StateVar, Structure, UpdateRule

__all__ = ["Assign", "DerivationError", "StateVar", "Structure", "UpdateRule", "derive"]
