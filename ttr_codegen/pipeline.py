"""The four stages end to end: spec -> derive -> lower -> render (nothing here touches the disk)."""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path

from .derive import DerivationError, Structure, UpdateRule, derive
from .lower import (AdjointPlan, AttentionPlan, ChunkPlan, FusedRecurrentPlan, NaivePlan, derivation_doc, lower,
                    lower_adjoint, lower_chunk, lower_fused_recurrent)
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
    spec_path: str = ""  # as written in the generated headers

    @property
    def structure(self) -> Structure:
        return self.rule.structure if self.rule is not None else Structure.NONLINEAR


def display_path(path: Path) -> str:
    """The spec path as written in generated headers: relative to the working directory when inside it."""
    try:
        return Path(os.path.relpath(path.resolve(), Path.cwd())).as_posix() if path.resolve().is_relative_to(
            Path.cwd()) else path.as_posix()
    except ValueError:
        return path.as_posix()


def _derive(spec: Spec) -> UpdateRule:
    try:
        return derive(spec)
    except DerivationError as error:
        raise SpecError([Diagnostic(spec.path, spec.position_of(error.field), error.field, error.message,
                                    error.hint)]) from None


def derive_spec(spec_path: Path) -> tuple[Spec, UpdateRule]:
    spec = load_spec(spec_path)
    return spec, _derive(spec)


def compile_spec(spec_path: Path, out_root: Path) -> Compiled:
    spec = load_spec(spec_path)
    spec_text, shown = spec_path.read_text(), display_path(spec_path)
    compiled = _compile(spec, shown, spec_text, out_root)
    clashes = _layer_name_clashes(spec, compiled.files)
    if spec.inputs:
        probe = _compile(spec.with_input_names(_probe_names(spec)), shown, spec_text, out_root, stamped=False)
        clashes += name_clashes(spec, probe.files)
    if clashes:
        raise SpecError(clashes)
    return compiled


def _layer_name_clashes(spec: Spec, files: list[RenderedFile]) -> list[Diagnostic]:
    """The layer's class (CamelName) must not shadow a module the generated code imports (e.g. 'f' -> F)."""
    imported = {(alias.asname or alias.name).split(".")[0] for f in files if f.relative_path.endswith(".py")
                for node in ast.walk(ast.parse(f.text))
                if isinstance(node, ast.Import) or isinstance(node, ast.ImportFrom) and node.level == 0  # not its own
                for alias in node.names}
    if spec.camel_name not in imported:
        return []
    return [Diagnostic(spec.path, spec.position_of("name"), "name",
                       f"the layer class '{spec.camel_name}' would shadow '{spec.camel_name}', which the generated code imports",
                       f"choose another name, e.g. '{spec.name}_layer'")]


def _compile(spec: Spec, shown_path: str, spec_text: str, out_root: Path, stamped: bool = True) -> Compiled:
    package_dir = out_root / spec.name
    if spec.regressor.cls == "mlp":  # a nonlinear memory: its own derivation (derive.online) and templates
        plan = lower_online(spec)
        files = render_online_layer(plan, shown_path, spec_text, package_dir, stamped)
        return Compiled(spec, None, plan, None, None, None, package_dir, files, shown_path)
    rule = _derive(spec)
    plan = lower(spec, rule)
    chunk = lower_chunk(spec, rule)
    fused = lower_fused_recurrent(spec, rule)
    adjoint = lower_adjoint(spec, rule, plan)
    files = render_layer(plan, shown_path, spec_text, package_dir, chunk, fused, adjoint, stamped)
    return Compiled(spec, rule, plan, chunk, fused, adjoint, package_dir, files, shown_path)


# Input names are the user's; the generated code's own names are the templates'. To find a clash without
# knowing every template's temporaries, the spec is compiled once more with each input renamed to a probe
# that can occur nowhere else: every identifier of that rendering holding a probe is an input's (k_t from k,
# dg_t from g, ...), every other one is the generated code's own.
def _probe_names(spec: Spec) -> dict[str, str]:
    return {i.name: f"zq{index}input" for index, i in enumerate(spec.inputs)}


def _names_in(node: ast.AST) -> set[str]:
    """Every name a piece of Python binds or reads (variables, parameters, imports, definitions; not attributes
    or keyword arguments)."""
    found = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            found.add(child.id)
        elif isinstance(child, ast.arg):
            found.add(child.arg)
        elif isinstance(child, (ast.FunctionDef, ast.ClassDef)):
            found.add(child.name)
        elif isinstance(child, ast.alias):
            found.add((child.asname or child.name).split(".")[0])
    return found


@dataclass(frozen=True)
class _Scope:
    names: set[str]  # what a top-level definition binds and reads, with the module-level names it sees
    first_binding: dict[str, int]  # the line after which each name the definition binds holds its value
    last_read: dict[str, int]  # the last line that reads each name
    loops: tuple[tuple[set[str], set[str]], ...] = ()  # (names bound, names read) in each loop's body


def _scope(definition: ast.AST, module_names: set[str]) -> _Scope:
    first_binding: dict[str, int] = {}
    last_read: dict[str, int] = {}
    for node in ast.walk(definition):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.For)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        first_binding[name.id] = min(first_binding.get(name.id, node.end_lineno), node.end_lineno)
        elif isinstance(node, ast.arg):
            first_binding[node.arg] = 0
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            last_read[node.id] = max(last_read.get(node.id, 0), node.lineno)
    # A nested function (a closure) reads its names whenever it is called, which may be after any line of the
    # definition: its reads count as the definition's last line.
    for nested in ast.walk(definition):
        if nested is not definition and isinstance(nested, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for node in ast.walk(nested):
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                    last_read[node.id] = max(last_read.get(node.id, 0), definition.end_lineno)
    loops = tuple(({n.id for n in ast.walk(loop) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)},
                   {n.id for n in ast.walk(loop) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)})
                  for loop in ast.walk(definition) if isinstance(loop, (ast.For, ast.While)))
    return _Scope(_names_in(definition) | module_names, first_binding, last_read, loops)


def _rebinds_only(scope: _Scope, own: str, probe: str) -> bool:
    """Whether an input named like the generated code's own variable `own` is harmless there: the variable is
    first bound after the input's last read (`beta = beta / (1 + beta * kk)`), and not in a loop that reads the
    input again, so one name serves both."""
    in_loop = any(own in bound and probe in read for bound, read in scope.loops)
    return (not in_loop and scope.first_binding.get(own, 0) > 0
            and scope.last_read.get(probe, 0) <= scope.first_binding[own])


def _scopes(files: list[RenderedFile]) -> list[_Scope]:
    scopes = []
    for f in files:
        if not f.relative_path.endswith(".py"):
            continue
        module = ast.parse(f.text)
        definitions = [n for n in module.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        module_names = {n.name for n in definitions} | set().union(
            *(_names_in(n) for n in module.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))))
        scopes += [_scope(n, module_names) for n in definitions]
        scopes.append(_Scope(module_names, {}, {}))
    return scopes


def name_clashes(spec: Spec, probe_files: list[RenderedFile]) -> list[Diagnostic]:
    """Diagnostics for inputs whose names (or the names derived from them, such as d<name> for a gradient) the
    generated code also uses in the same function."""
    probes = _probe_names(spec)
    clashes: dict[str, str] = {}
    for scope in _scopes(probe_files):
        names = scope.names
        own = {name for name in names if not any(p in name for p in probes.values())}
        derived = {user: {name.replace(probe, user) for name in names if probe in name} for user, probe in probes.items()}
        for user, produced in derived.items():
            others = set().union(*(d for u, d in derived.items() if u != user))
            clash = sorted(name for name in produced & (own | others)
                           if not (name == user and _rebinds_only(scope, user, probes[user])))
            if clash and user not in clashes:
                clashes[user] = clash[0]
    return [Diagnostic(spec.path, spec.position_of(f"inputs.{user}"), f"inputs.{user}",
                       f"the name '{user}' clashes with '{clash}', a name the generated code uses",
                       f"rename the input (e.g. '{user}_in') here and where it is referenced")
            for user, clash in clashes.items()]


# The generated ops a package can hold beside naive_<name>, as `ttr list` and the docs name them.
OPS = ("chunk", "flash", "flash_triton", "fused_recurrent", "chunk_triton")


def generated_ops(compiled: Compiled) -> list[str]:
    """naive, then the other ops the package holds (`OPS`)."""
    files = {f.relative_path for f in compiled.files}
    return ["naive"] + [op for op in OPS if f"{op}.py" in files]


def explanation(compiled: Compiled) -> list[str]:
    """The derivation as `ttr explain` prints it (and the docs' layer pages show it): the objective, the
    per-token update and read-out, structure, equivalences, states, cost and the adjoint; for a nonlinear
    memory, its network, optimiser and the derived gradient."""
    rule, plan = compiled.rule, compiled.plan
    if rule is None:
        return [*plan.description_lines, "the gradient of one token's loss, derived (x: the key, target: its fitted "
                "value):", *(f"  {line}" for line in plan.weight_gradient_lines)]
    lines = derivation_doc(rule)
    if rule.states:
        lines.append("states: " + ", ".join(f"{s.name} {s.shape_text} ({s.meaning})" for s in rule.states))
    else:
        lines.append("states: none of fixed size; each query reads the cache of the keys and values before it")
    lines.append(f"cost per token (multiply-adds per head): {plan.cost_per_token}")
    if compiled.adjoint is not None:
        lines.append("adjoint, one token backwards (dS: the gradient of the state after the token; S: the state "
                     "before it):")
        lines += [f"  {line}" for line in compiled.adjoint.doc]
    return lines
