"""Stage 2: `Spec` -> `UpdateRule` (SymPy)."""

from .derivation import DerivationError, derive
from .rule import Assign, StateVar, UpdateRule

__all__ = ["Assign", "DerivationError", "StateVar", "UpdateRule", "derive"]
