"""The four stages end to end: spec -> derive -> lower -> render (nothing here touches the disk)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .derive import DerivationError, UpdateRule, derive
from .lower import (AdjointPlan, AttentionPlan, ChunkPlan, FusedRecurrentPlan, NaivePlan, lower, lower_adjoint, lower_chunk,
                    lower_fused_recurrent)
from .lower_online import OnlinePlan, lower_online
from .render.files import RenderedFile, render_layer, render_online_layer
from .spec import Diagnostic, Spec, SpecError, load_spec


@dataclass(frozen=True)
class Compiled:
    spec: Spec
    rule: UpdateRule | None  # None for nonlinear memories (their plan holds the derived gradients)
    plan: NaivePlan | AttentionPlan | OnlinePlan
    chunk: ChunkPlan | None
    fused: FusedRecurrentPlan | None
    adjoint: AdjointPlan | None
    package_dir: Path
    files: list[RenderedFile]

    @property
    def structure(self) -> str:
        return self.rule.structure if self.rule is not None else "nonlinear"


def display_path(path: Path) -> str:
    """The spec path as written in generated headers: relative to the working directory when inside it."""
    try:
        return Path(os.path.relpath(path.resolve(), Path.cwd())).as_posix() if path.resolve().is_relative_to(
            Path.cwd()) else path.as_posix()
    except ValueError:
        return path.as_posix()


def derive_spec(spec_path: Path) -> tuple[Spec, UpdateRule]:
    spec = load_spec(spec_path)
    try:
        return spec, derive(spec)
    except DerivationError as error:
        raise SpecError([Diagnostic(spec.path, spec.position_of(error.field), error.field, error.message,
                                    error.hint)]) from None


def compile_spec(spec_path: Path, out_root: Path) -> Compiled:
    spec = load_spec(spec_path)
    if spec.regressor.cls == "mlp":  # a nonlinear memory: its own derivation (derive.online) and templates
        plan = lower_online(spec)
        package_dir = out_root / spec.name
        files = render_online_layer(plan, display_path(spec_path), spec_path.read_text(), package_dir)
        return Compiled(spec, None, plan, None, None, None, package_dir, files)
    spec, rule = derive_spec(spec_path)
    plan = lower(spec, rule)
    chunk = lower_chunk(spec, rule)
    fused = lower_fused_recurrent(spec, rule)
    adjoint = lower_adjoint(spec, rule, plan)
    package_dir = out_root / spec.name
    shown = display_path(spec_path)
    files = render_layer(plan, shown, spec_path.read_text(), package_dir, chunk, fused, adjoint)
    return Compiled(spec, rule, plan, chunk, fused, adjoint, package_dir, files)
