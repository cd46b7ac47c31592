"""Stage 3: `UpdateRule` + `Spec` -> a plan of plain strings and numbers that the templates lay out.

No SymPy object crosses into the templates: every piece of math is printed here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp
from sympy import MatrixSymbol

from .derive import Structure, UpdateRule
from .derive.rule import TextEnum
from .derive.algebra import Inner, K, MatPoly, V
from .render.torch_printer import TokenProgram
from .spec import InputSpec, Spec
from .spec.model import ROLES

_SHAPE_CODE = {("B", "T", "H"): "(B, T, H)", ("B", "T", "H", "K"): "(B, T, H, K)", ("H",): "(H,)", ("H", "K"): "(H, K)"}

# How the layer module produces each input from the hidden states (or as a parameter).
_PARAMETERISATION = {
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
    layer_kind: str  # "projection", "decay_projection", "per_head_decay", "positive_parameter"
    activation: str
    # Passed once per token but read per sub-step: a decay with several sub-steps acts at its token's first
    # sub-step only (log-decay 0 at the others); the ops spread it over the sub-step rows after their checks.
    spread: bool = False


def step_inputs(spec: Spec) -> tuple[set[str], set[str]]:
    """(the inputs read per sub-step, those of them passed per token and spread) for a rule with sub-steps."""
    if spec.optimiser.steps_per_token == 1:
        return set(), set()
    spread = {spec.weights.decay} if spec.weights.decay and spec.input(spec.weights.decay).per_token else set()
    return {spec.optimiser.step_size} | spread, spread


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
    structure: Structure
    delta_family: bool
    derivation_doc: tuple[str, ...]
    cost_per_token: str
    chunk_size: int
    block_v: int | None = None
    assign_lines: tuple[tuple[str, ...], ...] = ()  # step_lines after the sub-step's reads, one group per assignment
    solver_iterations: int | None = None  # the read-out's K x K solve by n conjugate-gradient steps (else exact)


def _flash_score(kernel: str) -> tuple[str, str] | None:
    """The log-weight of a key at a query as (the factor of q.k, the factor of ||k||^2), printed, for the
    local-constant Triton kernels; None where it is not of that form. A term in the query alone is left out:
    normalised weights are invariant to a shift per query (softmax(x + c) = softmax(x)), so it cancels
    exactly, in the output and in every gradient, and dropping it keeps the scores small."""
    qk, qq, kk, scale = sp.symbols("qk qq kk scale")
    log_weight = sp.expand({"exp_dot": scale * qk, "gaussian": -scale / 2 * (qq - 2 * qk + kk)}[kernel])
    dot, key_norm = log_weight.coeff(qk), log_weight.coeff(kk)
    query_only = log_weight.coeff(qq) * qq
    if sp.expand(log_weight - dot * qk - key_norm * kk - query_only) != 0 or not {dot, key_norm}.isdisjoint({qk, qq, kk}):
        return None
    return sp.pycode(dot), sp.pycode(key_norm)


_LOG_WEIGHT_CODE = {
    "exp_dot": "scale * q_h @ k_h.transpose(-1, -2)",
    "gaussian": "-0.5 * scale * (q_h[..., :, None, :] - k_h[..., None, :, :]).pow(2).sum(-1)",
}


@dataclass(frozen=True)
class AttentionPlan:
    """A nonparametric layer: each query fits its regressor over the keys it sees (no O(1) state)."""

    name: str
    camel_name: str
    description: str
    form: str  # "attention" (query-local weights) or "kernel_ridge"
    inputs: tuple[InputPlan, ...]
    default_scale: str
    kernel: str  # "exp_dot" or "gaussian"
    window: int | None
    decay: str | None
    degree: int | None
    ridge: float | None
    moments: tuple[str, ...]  # weighted moments the read-out needs
    readout_lines: tuple[str, ...]
    structure: Structure
    derivation_doc: tuple[str, ...]
    cost_per_token: str
    caches: tuple[str, ...]  # the state: every per-token tensor the weights of later queries need
    log_weight_code: str  # log s(k, q) for query rows `q_h` and key rows `k_h`, as [B, H, T, N]
    steps_per_token: int = 1
    chunk_size: int = 64
    block_v: int | None = None
    # The local-constant Triton kernels' log-weight, score_dot * q.k + score_key_norm * ||k||^2 (Python
    # expressions in scale; see _flash_score); None where those kernels do not apply.
    score_dot: str | None = None
    score_key_norm: str | None = None
    sample_weight: str | None = None  # an input multiplying each key's weight (log-weight + its log)
    solver_iterations: int | None = None  # the K x K solve by this many conjugate-gradient steps (None: exact)

    @property
    def flash_triton(self) -> bool:
        """Whether the local-constant Triton kernels (forward, backward) are generated."""
        return self.form == "attention" and self.degree == 0 and self.score_dot is not None

    @property
    def flash_linear_triton(self) -> bool:
        """Whether the local-linear Triton kernels (forward; the spec's conjugate-gradient solve) are generated."""
        return (self.form == "attention" and self.degree == 1 and self.solver_iterations is not None
                and self.score_dot is not None)

    @property
    def streaming(self) -> bool:
        """Whether a memory-efficient streaming path is generated (moments of degree <= 1)."""
        return self.form == "attention" and self.degree is not None and self.degree <= 1


def lower(spec: Spec, rule: UpdateRule) -> NaivePlan | AttentionPlan:
    if rule.form != "recurrent":
        return _lower_attention(spec, rule)
    return _lower_recurrent(spec, rule)


def _input_plans(spec: Spec, per_step_inputs: set[str], spread: set[str] = frozenset()) -> list[InputPlan]:
    inputs = []
    for i in spec.inputs:
        per_step = i.name in per_step_inputs
        passed_per_step = per_step and i.name not in spread  # how the caller passes it
        index = "t * n_steps + j" if per_step else "t"
        inputs.append(InputPlan(
            i.name, _SHAPE_CODE[i.shape].replace("T", "T * n_steps") if passed_per_step else _SHAPE_CODE[i.shape],
            "[" + ", ".join(i.shape).replace("T", "T*n" if passed_per_step else "T") + "]", i.role, ROLES[i.role],
            i.per_token, per_step, i.per_key, f"{i.name}[:, {index}]" if i.per_token else i.name,
            _layer_kind(i), _PARAMETERISATION.get((i.role, i.per_token), ""), i.name in spread))
    return inputs


def _lower_attention(spec: Spec, rule: UpdateRule) -> AttentionPlan:
    from .derive.nonparametric import N

    names = {"q": "q_h", "scale": "scale", "Y": "values", "kern": "kern", "kappa": "kappa", "gram": "gram"}
    for name in ("m_k", "h_kk", "m_v", "h_kv", "sigma", "r_kv", "delta"):
        names[name] = name
    iterations = _solver_iterations(spec)
    program = TokenProgram(names=names, dims={K: "K", V: "V", N: "N"}, python_scalars=frozenset({"scale"}),
                           **_solve_code(spec))
    lines = []
    for assign in rule.readout:
        expression = program.poly(assign.value)
        lines += program.lines + [f"{assign.target} = {expression}"]
        program.lines = []
    used = {symbol.name for assign in rule.readout for chain in assign.value.chains() for leaf in chain
            for symbol in leaf.atoms(MatrixSymbol)}
    moments = tuple(m for m in ("m_k", "h_kk", "m_v", "h_kv") if m in used)
    if rule.structure == Structure.LOCAL_POLYNOMIAL:
        moments = ()
    decay = spec.weights.decay
    if rule.form == "kernel_ridge":
        kernel = spec.regressor.kernel
    else:
        kernel = spec.weights.kernel
    # The cost is per query and grows with the N keys it sees.
    moment_cost = {"m_k": K, "h_kk": K * K, "m_v": V, "h_kv": K * V}
    cost = sum((moment_cost[m] for m in moments), 0) * N + program.cost + (K * N if rule.form == "attention" else 0)
    return AttentionPlan(
        spec.name, spec.camel_name, spec.docstring_description, rule.form, tuple(_input_plans(spec, set())),
        "K ** -0.5" if rule.scale is None else repr(rule.scale), kernel, spec.weights.window, decay,
        spec.regressor.degree, spec.optimiser.ridge, moments, tuple(lines), rule.structure,
        tuple(derivation_doc(rule)), str(sp.expand(cost)),
        ("k", "v") + tuple(name for name in (decay, spec.weights.sample_weight) if name),
        _LOG_WEIGHT_CODE[kernel], chunk_size=spec.schedule.chunk_size, sample_weight=spec.weights.sample_weight,
        solver_iterations=iterations,
        **(dict(zip(("score_dot", "score_key_norm"), score)) if (score := _flash_score(kernel)) else {}))


def _solver_iterations(spec: Spec) -> int | None:
    """The spec's conjugate-gradient steps for its K x K solves, or None for an exact solve."""
    return spec.optimiser.solver_iterations if spec.optimiser.solver == "cg" else None


def _solve_code(spec: Spec) -> dict:
    """How a program prints A^-1 b for this spec: the solver macro's helper for cg, else the default solve."""
    iterations = _solver_iterations(spec)
    return {"solve_code": f"_conjugate_gradient({{matrix}}, {{rhs}}, {iterations})"} if iterations else {}


def _lower_recurrent(spec: Spec, rule: UpdateRule) -> NaivePlan:
    n = rule.substeps
    per_step, spread = step_inputs(spec)
    inputs = _input_plans(spec, per_step, spread)

    names = {"q": "q_t", "k": "k_t", "v": "v_t", "scale": "scale"}
    for i in inputs:
        names[i.name] = f"{i.name}_t" if i.per_token else i.name
    for state in rule.states:
        names[state.name] = state.name
    for assign in rule.readout:
        names[assign.target] = assign.target
    names["P_new"] = "P"
    program = TokenProgram(names=names, dims={K: "K", V: "V"}, python_scalars=frozenset({"scale"}), **_solve_code(spec))

    token_lines = ["q_t = q[:, t]"]
    token_lines += [f"{i.name}_t = {i.token_code}" for i in inputs if i.per_token and not i.per_step]
    step_reads = _step_reads(inputs, "t * n_steps + j" if n > 1 else "t", rule.vectors)
    for leaf, gate in rule.vectors:
        names[leaf] = leaf
        if gate not in per_step:  # a gate read per sub-step has its exponential in the step reads
            token_lines.append(f"{leaf} = torch.exp({names[gate]})")

    assign_lines = []
    for assign in rule.update:
        program.lines = []
        expression = program.poly(assign.value)
        assign_lines.append((*program.lines, f"{assign.target} = {expression}"))
        program.forget(assign.target)
    step_lines = [*step_reads, *(line for group in assign_lines for line in group)]
    update_cost = program.cost

    program.lines, program.memo, program.cost = [], {}, 0
    readout_lines = []
    for assign in rule.readout:
        expression = program.poly(assign.value)
        readout_lines += program.lines + [f"{assign.target} = {expression}"]
        program.lines = []
    cost = (update_cost * n + program.cost).expand()

    states = tuple(StatePlan(s.name, "(" + ", ".join(["B", "H"] + [d for d in (s.rows, s.cols) if d != "1"]) + ")", s.shape_text,
                             s.meaning, _init_code(s, spec)) for s in rule.states)
    return NaivePlan(
        spec.name, spec.camel_name, spec.docstring_description, tuple(inputs), states, n,
        "K ** -0.5" if rule.scale is None else repr(rule.scale),
        tuple(token_lines), tuple(step_lines), tuple(readout_lines), rule.structure,
        rule.structure.delta_family,
        tuple(derivation_doc(rule)), str(cost), spec.schedule.chunk_size, spec.schedule.block_v,
        tuple(assign_lines), _solver_iterations(spec))


@dataclass(frozen=True)
class AdjointPlan:
    """The derived reverse-time step, printed for the PyTorch reference backward (`naive_<name>_backward`).

    readout_lines add the token's output to the states' adjoints d<X> and set dq_t (the states after the
    token). `steps` reverse the update's assignments, last first: (the assignment's index, its lines),
    which set d<x>_t for the inputs it reads, add to the adjoints of the other states and replace its own
    (the states as they were before the assignment). `gradients` lists (input, where its per-step gradient
    goes: "step", "token" or "head").
    """

    readout_lines: tuple[str, ...]
    step_reads: tuple[str, ...]  # a sub-step's k, v and per-step inputs at row t * n_steps + j (any n_steps)
    steps: tuple[tuple[int, tuple[str, ...]], ...]
    gradients: tuple[tuple[str, str], ...]
    doc: tuple[str, ...]  # the adjoint in plain text, for docstrings
    readout_gradients: tuple[tuple[str, str], ...] = ()  # inputs only the read-out reads (mesa's ridge): (name, where)


def lower_adjoint(spec: Spec, rule: UpdateRule, plan: NaivePlan) -> AdjointPlan | None:
    """The adjoint of a recurrent rule in the naive loop's names, or None where it is not derived yet."""
    from .derive.adjoint import derive_adjoint

    if not isinstance(plan, NaivePlan):
        return None
    try:
        adjoint = derive_adjoint(rule)
    except NotImplementedError:
        return None
    names = {"q": "q_t", "k": "k_t", "v": "v_t", "scale": "scale", "do": "do_t"}
    names |= {s.name: s.name for s in rule.states} | {f"d{s.name}": f"d{s.name}" for s in rule.states}
    names |= {i.name: (f"{i.name}_t" if i.per_token else i.name) for i in plan.inputs}
    names |= {leaf: leaf for leaf, _ in rule.vectors}  # per-key gates: exp_g = torch.exp(g_t), set per token
    names |= {a.target: a.target for a in rule.readout[:-1]} | {f"d{a.target}": f"d{a.target}" for a in rule.readout[:-1]}

    def new_program() -> TokenProgram:
        return TokenProgram(names=names, dims={K: "K", V: "V"}, python_scalars=frozenset({"scale"}), **_solve_code(spec))

    program = new_program()
    # The read-out's intermediates again (mesa's h_reg, from the states after the token), then their adjoints.
    readout = []
    for target, value in [*((a.target, a.value) for a in rule.readout[:-1]),
                          *((f"d{name}", value) for name, value in adjoint.readout_intermediates)]:
        expression = program.poly(value)
        readout += [*program.lines, f"{target} = {expression}"]
        program.lines = []
    updates = [_add_to(f"d{state}", _adjoint_code(program, value)) for state, value in adjoint.readout.items()]
    query = program.poly(adjoint.readout_query)
    inputs = [f"d{name}_t = {_adjoint_code(program, value)}" for name, value in adjoint.readout_inputs.items()]
    readout += program.lines + updates + inputs + [f"dq_t = {query}"]
    steps, gradients, seen = [], {}, set()
    where = {i.name: ("step" if i.per_step else "token" if i.per_token else "head") for i in plan.inputs}
    for index, step in zip(reversed(range(len(rule.update))), adjoint.steps):
        program = new_program()  # each assignment reads the states as they were before it
        lines = [_add_to(f"d{other}", _adjoint_code(program, value)) for other, value in step.others.items()]
        for name, value in step.inputs.items():
            code = _adjoint_code(program, value)
            lines.append(_add_to(f"d{name}_t", code) if name in seen else f"d{name}_t = {code}")
            seen.add(name)
            gradients.setdefault(name, where.get(name, "step"))  # k and v are per step
        target = _adjoint_code(program, step.target)
        # Temporaries first (they read d<target> and the states before the assignment), d<target> replaced last.
        steps.append((index, (*program.lines, *lines, f"d{step.name} = {target}")))
    return AdjointPlan(tuple(readout), tuple(_step_reads(plan.inputs, "t * n_steps + j", rule.vectors)), tuple(steps),
                       tuple(gradients.items()), tuple(adjoint.lines()),
                       tuple((name, where[name]) for name in adjoint.readout_inputs))


def _add_to(name: str, code: str) -> str:
    """`name = name + code`, with a leading minus kept inside parentheses."""
    return f"{name} = {name} + ({code})" if code.startswith("-") else f"{name} = {name} + {code}"


def _adjoint_code(program: TokenProgram, value) -> str:
    """A gradient as code: a MatPoly, a per-key gate's RowDot or a scalar."""
    from .derive.adjoint import RowDot

    if isinstance(value, RowDot):  # the row sums of an element-wise product, times the gate's exp
        code = f"{_grouped(program.poly(value.left))} * {_grouped(program.poly(value.right))}"
        # a K x V product sums its rows; a K-vector one (a normaliser z's) is its own row sums
        code = f"({code}).sum(-1)" if value.right.cols != 1 else code
        return f"{value.times.name} * {code}" if value.times is not None else code
    if isinstance(value, MatPoly):
        return program.poly(value)
    return program.scalar(value)


def _grouped(code: str) -> str:
    """A sum as a factor: in parentheses."""
    return f"({code})" if " + " in code or " - " in code or code.startswith("-") else code


def _step_reads(inputs, row: str, vectors=()) -> list[str]:
    """A sub-step's reads of k, v and the per-step inputs, at the row given as code (and the exponentials of
    per-key gates read per sub-step)."""
    per_step = [i.name for i in inputs if i.per_step]
    return ([f"{x}_t = {x}[:, {row}]" for x in ("k", "v", *per_step)]
            + [f"{leaf} = torch.exp({gate}_t)" for leaf, gate in vectors if gate in per_step])


def _layer_kind(i: InputSpec) -> str:
    if i.per_token and i.role == "log_decay":
        return "decay_projection"
    if i.per_token:
        return "projection"
    if i.role == "log_decay":
        return "per_head_decay"
    return "positive_parameter"


def _init_code(state, spec: Spec) -> str:
    shape = ", ".join(["B", "H"] + [d for d in (state.rows, state.cols) if d != "1"])
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


class Family(TextEnum):
    """The chunked algorithm of a recurrence (see ChunkPlan)."""

    GATED = "gated"  # a gated sum of writes: intra-chunk scores and a pass over chunk states
    DELTA = "delta"  # a rank-one step per token or sub-step: the UT transform
    MOMENTUM = "momentum"  # a stacked (S, Z) state: one triangular system per chunk
    SECOND_ORDER = "second_order"  # key moments and a K x K solve, or RLS's covariance form


class Gate(TextEnum):
    """How a recurrence forgets: not at all, by one number per token, or per key channel."""

    NONE = "none"
    SCALAR = "scalar"
    PER_KEY = "per_key"


@dataclass(frozen=True)
class ChunkPlan:
    """The chunked form of a recurrence, in one of four families (the two affine ones spelled out here).

    gated:  S_t = Diag(exp(log_decay_t)) S_(t-1) + k_t v_t^T         (additive, or diagonal per key)
    delta:  S_t = exp(log_decay_t) S_(t-1) + k_t u_t^T with u_t = beta_t (v_t - k_t^T S_read), where the error
            reads S_read = exp(log_decay_t) S_(t-1) ("decayed", e.g. Gated DeltaNet) or S_(t-1) ("previous",
            e.g. its L2 reading): whichever keeps beta and the value scale free of exp(-log_decay)
    momentum (Titans) and second_order (mesa, RLS) have templates of their own.
    The prep lines compute log_decay, beta and rescaled v for the whole sequence from the derived
    coefficients (e.g. Longhorn's beta -> beta / (1 + beta k^T k)).
    """

    family: Family
    gate: Gate
    prep_lines: tuple[str, ...]
    substeps: int
    variant: str = ""  # second order: "exact", "cg" (the spec's conjugate-gradient solve) or "rls"
    ridge: str = ""  # second order: the ridge as code (a matrix to add for "exact", a vector for "cg", a number for "rls")
    # Second order: an affine memory W^T k + b. "exact" runs it as the linear memory of keys and queries with one
    # more feature, a constant 1 (b is its weight row), the ridge leaving that feature free; "cg" steps through
    # its centred system, the linear memory's minus a rank-one term, as its oracle does.
    intercept: bool = False
    solver_iterations: int | None = None  # second order, "cg": the steps per query
    error_read: str = "decayed"  # delta family: the state its errors read, "decayed" or "previous"
    # Delta family: the effective step as Triton lines on a block of rows (k a [rows, BK] tile, the step
    # input a [rows] vector; the last line assigns `beta`), so that the prepare kernel computes it from the
    # keys it loads anyway instead of the host making passes over k. Empty: the host computes it.
    kernel_step: tuple[str, ...] = ()
    step_input: str = ""  # the input the kernel_step lines read
    host_step_lines: tuple[str, ...] = ()  # the prep lines that kernel_step replaces
    rescales_values: bool = False  # the prep lines rescale v (a per-sample weight, or a step's value factor)
    prep_reads_n_steps: bool = False  # the prep lines read n_steps (the sub-step rows per token)
    normalised: bool = False  # o = S^T q / z^T q: z rides along as one more value column (a value of 1)
    step_per_key: bool = False  # delta family: beta is [.., K], a diagonal preconditioner: the write key is beta * k
    # A per-key gate's input where it is the log-decay itself: the Triton path passes it on in its dtype (the
    # cumsum kernel reads any), since a float32 copy of a tensor as large as k costs a pass over memory.
    gate_input: str = ""

    @property
    def triton_prep_lines(self) -> tuple[str, ...]:
        """The prep lines the Triton path runs on the host."""
        return tuple(line for line in self.prep_lines if line not in self.host_step_lines)


def lower_chunk(spec: Spec, rule: UpdateRule) -> ChunkPlan | None:
    """The chunked plan of a recurrent rule, or None where this version has none (attention forms)."""
    from .derive.derivation import S as S_SYMBOL
    from .derive.derivation import k as k_symbol
    from .derive.derivation import v as v_symbol

    if rule.form != "recurrent":
        return None
    if rule.structure == Structure.STACKED_AFFINE:
        return _lower_momentum_chunk(spec, rule)
    if rule.structure == Structure.SECOND_ORDER and spec.regressor.cls == "linear":
        return _lower_second_order_chunk(spec)
    if rule.structure == Structure.SECOND_ORDER and spec.regressor.cls == "affine":
        return _lower_affine_chunk(spec, rule)
    # A sum-normalised read-out keeps a second state z, S's recurrence with a value of 1 (gradient_step_from_zero).
    normalised = spec.readout.normalise == "sum"
    if len(rule.states) != 1 + normalised or rule.structure not in (
            Structure.ADDITIVE, Structure.DIAGONAL, Structure.DELTA, Structure.DELTA_PRODUCT,
            Structure.DIAGONAL_PLUS_RANK_ONE):
        return None
    a, b = rule.update[0].value.split_on(S_SYMBOL)
    # A step per key channel (a diagonal preconditioner) leads the write and the rank-one term: Diag(beta) k ...
    step_per_key = rule.structure == Structure.DIAGONAL_PLUS_RANK_ONE and spec.input(spec.optimiser.step_size).per_key
    preconditioner = (sp.DiagMatrix(sp.MatrixSymbol(spec.optimiser.step_size, K, 1)),) if step_per_key else ()
    kv = (*preconditioner, k_symbol, sp.Transpose(v_symbol))
    if set(b.chains()) != {kv}:
        return None
    write = b.coefficient(kv)
    # The chunked form runs over sub-step rows (T * n_steps): a per-token input other than the per-step step size
    # (a weight decay's forget fraction) holds for each of its token's sub-steps.
    read_per_step, _ = step_inputs(spec)
    names = {i.name: (f"{i.name}.repeat_interleave(n_steps, dim=1)" if rule.substeps > 1 and i.per_token
                      and i.name not in read_per_step else i.name) for i in spec.inputs} | {"k": "k", "v": "v"}
    program = TokenProgram(names=names, dims={K: "K", V: "V"})
    lines: list[str] = []
    error_read = "decayed"
    scalar_log_decay = None  # a scalar gate's log-decay, as an expression over the inputs
    gate_input = ""  # the input that is a per-key log-decay itself
    if rule.structure == Structure.DIAGONAL:
        (diag_chain,) = a.chains()
        gate_input = dict(rule.vectors)[diag_chain[0].args[0].name]
        lines.append(f"log_decay = {gate_input}")
        gate = Gate.PER_KEY
        family = Family.GATED
        beta, value_scale = None, write  # a per-sample weight scales the write
    elif rule.structure == Structure.DIAGONAL_PLUS_RANK_ONE:
        # S_t = Diag(d) S - r P k k^T Diag(d) S + w P k v^T = Diag(d) S + r P k ((w / r) v - k^T Diag(d) S)^T: a
        # per-key decay (or a scalar one, d I, or none), then a delta step whose errors read the decayed state
        # (KDA's form), preconditioned by P = Diag(beta) where the step is per key channel.
        diagonal = [chain for chain in a.chains() if len(chain) <= 1]
        if len(diagonal) != 1:
            return None
        gate_chain = diagonal[0]
        decay = a.coefficient(gate_chain)  # 1 for a per-key gate (its leaf holds it)
        rank_one_chain = (*preconditioner, k_symbol, sp.Transpose(k_symbol), *gate_chain)
        if set(a.chains()) != {gate_chain, rank_one_chain} or (gate_chain and decay != 1):
            return None
        if gate_chain:
            gate_input = dict(rule.vectors)[gate_chain[0].args[0].name]
            lines.append(f"log_decay = {gate_input}")
        elif decay == 1:
            lines.append("log_decay = torch.zeros_like(k)  # no decay: every key channel keeps all")
        else:  # a scalar decay, the same for every key channel
            scalar_log_decay = sp.expand_log(sp.log(decay), force=True)
            log_code = program.scalar(scalar_log_decay)
            if scalar_log_decay.has(sp.log):  # a retention such as 1 - alpha may be 0 (see the scalar gate below)
                log_code = f"{log_code}.clamp_min(-1e4)"
            lines.append(f"log_decay = torch.broadcast_to(({log_code})[..., None], (B, T * n_steps, H, K))")
        gate, family = Gate.PER_KEY, Family.DELTA
        rank_one = -a.coefficient(rank_one_chain) / decay
        beta, value_scale = sp.simplify(rank_one), sp.simplify(write / rank_one)
        if step_per_key:  # the templates read the preconditioner's diagonal (times any scalar factor) as beta
            beta = sp.Symbol(spec.optimiser.step_size, real=True) * beta
    else:
        decay = a.coefficient(())
        log_decay = sp.expand_log(sp.log(decay), force=True)
        gate = Gate.NONE if log_decay == 0 else Gate.SCALAR
        if gate == Gate.SCALAR:
            scalar_log_decay = log_decay
            log_code = program.scalar(log_decay)
            if log_decay.has(sp.log):  # a retention such as 1 - alpha may be 0: log 0 = -inf; exp(-1e4) is 0 alike
                log_code = f"{log_code}.clamp_min(-1e4)"
            lines.append(f"log_decay = torch.broadcast_to({log_code}, (B, T * n_steps, H))")
        if rule.structure == Structure.ADDITIVE:
            family, beta, value_scale = Family.GATED, None, write
        else:
            # S_t = d S - r k k^T S + w k v^T = d S + beta k (alpha v - c k^T S)^T with beta c = r, beta alpha = w.
            # Reading the decayed state (c = d) or the previous one (c = 1) gives the same layer; take the one
            # whose beta and alpha do not grow like 1 / d, which would overflow for strongly decaying gates.
            rank_one = -a.coefficient((k_symbol, sp.Transpose(k_symbol)))
            family = Family.DELTA
            beta, value_scale = sp.simplify(rank_one / decay), sp.simplify(write * decay / rank_one)
            if _grows_as_gate_closes(beta, decay) or _grows_as_gate_closes(value_scale, decay):
                error_read = "previous"
                beta, value_scale = sp.simplify(rank_one), sp.simplify(write / rank_one)
    step_start = len(lines)
    if beta is not None:  # the templates read the effective step as `beta`
        code = program.scalar(beta)
        if code != "beta":
            lines += program.lines + [f"beta = {code}"]
        program.lines = []
    rescaled_values = value_scale is not None and value_scale != 1
    if rescaled_values:
        code = program.scalar(value_scale)
        lines += program.lines + [f"v = ({code})[..., None] * v"]
    # The prep lines read n_steps where they broadcast a scalar gate over the sub-step rows, or repeat a
    # per-token input that a coefficient reads over them.
    coefficients = [x for x in (beta, value_scale, scalar_log_decay) if isinstance(x, sp.Basic)]
    read = {getattr(symbol, "name", "") for x in coefficients for symbol in x.free_symbols}
    repeated = {i.name for i in spec.inputs if rule.substeps > 1 and i.per_token and i.name not in read_per_step}
    if gate_input in read:
        gate_input = ""  # a coefficient computes with it too: the host takes it in float32
    flags = dict(error_read=error_read, rescales_values=rescaled_values, step_per_key=step_per_key, gate_input=gate_input,
                 prep_reads_n_steps=scalar_log_decay is not None or bool(repeated & read), normalised=normalised)
    # A step the prepare kernel can compute (its value-rescale line, if any, may read the step's temporaries).
    # (With a per-key gate A comes from the scores kernel, which does not derive a step: the host does.)
    step = _kernel_step(spec, beta) if beta is not None and not rescaled_values and gate != Gate.PER_KEY else None
    if step is None:
        return ChunkPlan(family, gate, tuple(lines), rule.substeps, **flags)
    step_input, step_lines = step
    return ChunkPlan(family, gate, tuple(lines), rule.substeps, kernel_step=step_lines, step_input=step_input,
                     host_step_lines=tuple(lines[step_start:]), **flags)


def _kernel_step(spec: Spec, beta: sp.Expr) -> tuple[str, tuple[str, ...]] | None:
    """A delta-family step that reads the keys (e.g. Longhorn's beta / (1 + beta k^T k)) as Triton lines on
    a block of rows, or None where it is a plain input (nothing to compute) or reads more than the keys and
    one per-token input (it then stays on the host)."""
    from .render.triton_printer import TritonRowProgram

    inners = beta.atoms(Inner)
    if not inners:
        return None
    symbols = {x.name for x in beta.xreplace({i: sp.Integer(1) for i in inners}).free_symbols}
    if len(symbols) != 1:
        return None
    (name,) = symbols
    if not any(i.name == name and i.per_token and not i.per_key for i in spec.inputs):
        return None
    program = TritonRowProgram(names={name: name, "k": "k"}, dims={K: "K", V: "V"})
    try:
        code = program.scalar(beta)
    except NotImplementedError:
        return None
    return name, tuple(program.lines + [f"beta = {code}"])


def _grows_as_gate_closes(expression: sp.Expr, decay: sp.Expr) -> bool:
    """Whether `expression` grows without bound as the gate `decay` (e.g. exp(g)) goes to 0."""
    log_decay = sp.expand_log(sp.log(decay), force=True)
    if len(log_decay.free_symbols) != 1:
        return False  # a constant gate, or one of several inputs: no single knob closes it
    (symbol,) = log_decay.free_symbols
    gate = sp.Dummy("gate", positive=True)
    solutions = sp.solve(sp.Eq(log_decay, sp.log(gate)), symbol)
    if len(solutions) != 1:
        return False
    in_gate = sp.simplify(expression.subs(symbol, solutions[0]))
    return sp.limit(in_gate, gate, 0, "+").has(sp.oo, -sp.oo, sp.zoo)  # e.g. beta/gate -> oo*sign(beta)


def _lower_momentum_chunk(spec: Spec, rule: UpdateRule) -> ChunkPlan:
    """Read theta, eta and rho off the derived (Z, S) updates."""
    from .derive.derivation import S as S_SYMBOL
    from .derive.derivation import k as k_symbol

    z_update = next(a.value for a in rule.update if a.target == "Z")
    s_update = next(a.value for a in rule.update if a.target == "S")
    z_symbol = next(leaf for chain in s_update.chains() for leaf in chain if getattr(leaf, "name", "") == "Z")
    eta = z_update.coefficient((z_symbol,))
    theta = -z_update.coefficient((k_symbol, sp.Transpose(k_symbol), S_SYMBOL))
    rho = s_update.coefficient((S_SYMBOL,))
    program = TokenProgram(names={i.name: i.name for i in spec.inputs}, dims={K: "K", V: "V"})
    lines = [f"{name} = torch.broadcast_to({program.scalar(value)}, (B, T, H))" if value.free_symbols
             else f"{name} = q.new_full((B, T, H), {float(value)!r})"  # e.g. rho = 1 without weight decay
             for name, value in (("theta", theta), ("eta", eta), ("rho", rho))]
    return ChunkPlan(Family.MOMENTUM, Gate.SCALAR, tuple(program.lines + lines), 1)


def _lower_second_order_chunk(spec: Spec) -> ChunkPlan:
    """Exact ridge (h_kk, h_kv) and recursive least squares (its decayed-prior twin) share one form."""
    decay, weight = spec.weights.decay, spec.weights.sample_weight
    lines = [f"log_decay = torch.broadcast_to({decay}, (B, T, H))" if decay else "log_decay = q.new_zeros(B, T, H)",
             f"weight = torch.broadcast_to({weight}, (B, T, H))" if weight else "weight = q.new_ones(B, T, H)"]
    ridge = spec.optimiser.ridge
    if spec.optimiser.method == "recursive_least_squares":
        return ChunkPlan(Family.SECOND_ORDER, Gate.SCALAR, tuple(lines), 1, "rls", repr(ridge))
    if (iterations := _solver_iterations(spec)) is not None:
        # The ridge's diagonal, [H, 1, 1, K] (or a number): it scales the tokens' [B, H, N, C, K] rows.
        if isinstance(ridge, str):
            code = f"{ridge}[:, None, None, :]" if spec.input(ridge).per_key else f"{ridge}[:, None, None, None]"
        else:
            code = repr(ridge)
        return ChunkPlan(Family.SECOND_ORDER, Gate.SCALAR, tuple(lines), 1, "cg", code, solver_iterations=iterations)
    if isinstance(ridge, str):
        per_key = spec.input(ridge).per_key
        # [H, 1, 1, K, K]: broadcast over the batch, the chunks and the tokens of a chunk
        code = (f"torch.diag_embed({ridge})[:, None, None]" if per_key
                else f"{ridge}[:, None, None, None, None] * eye_k")
    else:
        code = f"{ridge!r} * eye_k"
    return ChunkPlan(Family.SECOND_ORDER, Gate.SCALAR, tuple(lines), 1, "exact", code)


# The affine memory's states, whose augmented blocks are a linear memory's moments (`_lower_affine_chunk`).
AFFINE_STATES = ("omega", "m_k", "h_kk", "m_v", "h_kv")


def _lower_affine_chunk(spec: Spec, rule: UpdateRule) -> ChunkPlan | None:
    """An exact affine memory as the linear one of keys with a constant feature 1: its moments are the blocks
    [[h_kk, m_k], [m_k^T, omega]] and [[h_kv], [m_v^T]], and with the ridge's last entry 0 the augmented solve
    is the centred one (a Schur complement). Solved by conjugate gradients it steps through the centred system
    itself (the augmented system's iterates differ), applied from the moments as the linear memory's is."""
    if spec.optimiser.method != "exact" or tuple(s.name for s in rule.states) != AFFINE_STATES:
        return None
    plan = _lower_second_order_chunk(spec)
    if plan.variant == "cg":
        return replace(plan, intercept=True)
    ridge = spec.optimiser.ridge
    if isinstance(ridge, str) and spec.input(ridge).per_key:  # [H, K] -> [H, 1, 1, K + 1, K + 1], the last entry 0
        plan = replace(plan, ridge=f"torch.diag_embed(torch.nn.functional.pad({ridge}, (0, 1)))[:, None, None]")
    return replace(plan, intercept=True)  # otherwise the ridge scales eye_k, whose intercept entry is 0


@dataclass(frozen=True)
class FusedRecurrentPlan:
    """A Triton kernel that runs the derived per-token update on [BK, BV] register tiles."""

    states: tuple[str, ...]  # every state is a K x V tile
    head_lines: tuple[str, ...]  # loads of per-head inputs, before the token loop
    token_lines: tuple[str, ...]  # loads (and per-key exponentials) per token
    step_lines: tuple[str, ...]  # loads per sub-step, then the update
    readout_lines: tuple[str, ...]
    substeps: int


def lower_fused_recurrent(spec: Spec, rule: UpdateRule) -> FusedRecurrentPlan | None:
    """The fused recurrent kernel of a rule whose states are all K x V, or None."""
    from .render.triton_printer import TritonTokenProgram, exp_line, load_line

    if rule.form != "recurrent" or any((s.rows, s.cols) != ("K", "V") for s in rule.states):
        return None
    n = rule.substeps
    per_step, _ = step_inputs(spec)
    names = {"q": "q_t", "k": "k_t", "v": "v_t", "scale": "scale"} | {s.name: s.name for s in rule.states}
    head, token, step = [], [], [load_line("k", "step", lanes="K"), load_line("v", "step", lanes="V")]
    for i in spec.inputs:
        if not i.per_token:
            names[i.name] = f"{i.name}_h"
            head.append(load_line(i.name, "head", i.per_key))
            continue
        names[i.name] = f"{i.name}_t"
        position = "step" if i.name in per_step else "row"
        (step if i.name in per_step else token).append(load_line(i.name, position, i.per_key))
    for leaf, gate in rule.vectors:
        names[leaf] = leaf
        (step if gate in per_step else token).append(exp_line(leaf, names[gate]))
    program = TritonTokenProgram(names=names, dims={K: "K", V: "V"}, python_scalars=frozenset({"scale"}))
    try:
        for assign in rule.update:
            program.lines = []
            expression = program.poly(assign.value)
            step += program.lines + [f"{assign.target} = {expression}"]
            program.forget(assign.target)
        program.lines, program.memo = [], {}
        expression = program.poly(rule.readout[-1].value)
    except NotImplementedError:
        return None
    readout = program.lines + [f"o_t = {expression}"]
    return FusedRecurrentPlan(tuple(s.name for s in rule.states), tuple(head), tuple(token), tuple(step),
                              tuple(readout), n)
