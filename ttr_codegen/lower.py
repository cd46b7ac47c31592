"""Stage 3: `UpdateRule` + `Spec` -> a plan of plain strings and numbers that the templates lay out.

No SymPy object crosses into the templates: every piece of math is printed here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .derive import UpdateRule
from .derive.algebra import K, V
from .render.torch_printer import TokenProgram
from .spec import InputSpec, Spec

_SHAPE_CODE = {("B", "T", "H"): "(B, T, H)", ("B", "T", "H", "K"): "(B, T, H, K)", ("H",): "(H,)", ("H", "K"): "(H, K)"}

# How the layer module produces each input from the hidden states (or as a parameter).
_PARAMETERISATION = {
    ("log_decay", True): "F.logsigmoid",  # gates in (-inf, 0)
    ("step_size", True): "torch.sigmoid",
    ("sample_weight", True): "torch.sigmoid",
    ("forget", True): "torch.sigmoid",
    ("momentum", True): "torch.sigmoid",
}


@dataclass(frozen=True)
class InputPlan:
    name: str
    shape_code: str  # expected shape, as code
    shape_text: str  # for docs, e.g. "[B, T, H]"
    role: str
    role_text: str
    per_token: bool
    per_step: bool  # indexed per sub-step (steps_per_token > 1)
    per_key: bool
    token_code: str  # how one token's (or sub-step's) slice is read
    layer_kind: str  # "projection", "per_head_decay", "ridge_parameter"
    activation: str


@dataclass(frozen=True)
class StatePlan:
    name: str
    shape_code: str
    shape_text: str
    meaning: str
    init_code: str


@dataclass(frozen=True)
class NaivePlan:
    name: str
    camel_name: str
    description: str
    inputs: tuple[InputPlan, ...]
    states: tuple[StatePlan, ...]
    steps_per_token: int
    default_scale: str
    token_lines: tuple[str, ...]  # per token, before the sub-steps
    step_lines: tuple[str, ...]  # the state update (per sub-step)
    readout_lines: tuple[str, ...]
    structure: str
    delta_family: bool
    derivation_doc: tuple[str, ...]
    cost_per_token: str
    chunk_size: int


def lower(spec: Spec, rule: UpdateRule) -> NaivePlan:
    from .spec.model import ROLES

    n = rule.substeps
    step_inputs = {spec.optimiser.step_size} if n > 1 else set()
    inputs = []
    for i in spec.inputs:
        per_step = i.name in step_inputs
        index = "t * n_steps + j" if per_step else "t"
        inputs.append(InputPlan(
            i.name, _SHAPE_CODE[i.shape].replace("T", "T * n_steps") if per_step else _SHAPE_CODE[i.shape],
            "[" + ", ".join(i.shape).replace("T", "T*n" if per_step else "T") + "]", i.role, ROLES[i.role],
            i.per_token, per_step, i.per_key, f"{i.name}[:, {index}]" if i.per_token else i.name,
            _layer_kind(i), _PARAMETERISATION.get((i.role, i.per_token), "")))

    names = {"q": "q_t", "k": "k_t", "v": "v_t", "scale": "scale"}
    for i in inputs:
        names[i.name] = f"{i.name}_t" if i.per_token else i.name
    for state in rule.states:
        names[state.name] = state.name
    for assign in rule.readout:
        names[assign.target] = assign.target
    names["P_new"] = "P"
    program = TokenProgram(names=names, dims={K: "K", V: "V"}, python_scalars=frozenset({"scale"}))

    token_lines = ["q_t = q[:, t]"]
    token_lines += [f"{i.name}_t = {i.token_code}" for i in inputs if i.per_token and not i.per_step]
    step_reads = ["k_t = k[:, t * n_steps + j]" if n > 1 else "k_t = k[:, t]",
                  "v_t = v[:, t * n_steps + j]" if n > 1 else "v_t = v[:, t]"]
    step_reads += [f"{i.name}_t = {i.token_code}" for i in inputs if i.per_step]
    for leaf, gate in rule.vectors:
        names[leaf] = leaf
        token_lines.append(f"{leaf} = torch.exp({names[gate]})")

    step_lines = list(step_reads)
    for assign in rule.update:
        program.lines = []
        expression = program.poly(assign.value)
        step_lines += program.lines + [f"{assign.target} = {expression}"]
        program.forget(assign.target)
    update_cost = program.cost

    program.lines, program.memo, program.cost = [], {}, 0
    readout_lines = []
    for assign in rule.readout:
        expression = program.poly(assign.value)
        readout_lines += program.lines + [f"{assign.target} = {expression}"]
        program.lines = []
    cost = (update_cost * n + program.cost).expand()

    states = tuple(StatePlan(s.name, f"(B, H, {s.rows}{', ' + s.cols if s.cols != '1' else ''})", s.shape_text,
                             s.meaning, _init_code(s, spec)) for s in rule.states)
    return NaivePlan(
        spec.name, spec.camel_name, spec.description, tuple(inputs), states, n,
        "K ** -0.5" if rule.scale is None else repr(rule.scale),
        tuple(token_lines), tuple(step_lines), tuple(readout_lines), rule.structure,
        rule.structure in ("delta", "delta-product", "diagonal-plus-rank-one"),
        tuple(derivation_doc(rule)), str(cost), spec.schedule.chunk_size)


def _layer_kind(i: InputSpec) -> str:
    if i.per_token:
        return "projection"
    if i.role == "log_decay":
        return "per_head_decay"
    return "positive_parameter"


def _init_code(state, spec: Spec) -> str:
    shape = f"B, H, {state.rows}" + (f", {state.cols}" if state.cols != "1" else "")
    if state.init == "identity_over_ridge":
        return f"torch.eye(K, dtype=acc, device=q.device).expand({shape}) / {spec.optimiser.ridge!r}"
    return f"q.new_zeros({shape})"


def derivation_doc(rule: UpdateRule) -> list[str]:
    """The derivation in plain text, for docstrings and `ttr explain`."""
    lines = [f"objective: {rule.objective_text}", f"structure: {rule.structure} -- {rule.structure_detail}"]
    prefix = "per sub-step" if rule.substeps > 1 else "per token"
    for assign in rule.update:
        lines.append(f"{prefix}: {assign.target} <- {assign.value}")
    for assign in rule.readout:
        lines.append(f"read-out: {assign.target} = {assign.value}")
    lines += [f"equivalent: {e}" for e in rule.equivalences]
    return lines
