"""Stage 1: YAML spec -> validated `Spec`."""

from .diagnostics import Diagnostic, Position, SpecError
from .model import InputSpec, Optimiser, Readout, Regressor, Schedule, Spec, Weights, load_spec, parse_spec

__all__ = ["Diagnostic", "InputSpec", "Optimiser", "Position", "Readout", "Regressor", "Schedule", "Spec", "SpecError",
           "Weights", "load_spec", "parse_spec"]
