"""The validated spec: the three design choices of test-time regression, plus read-out and schedule.

`load_spec` turns a YAML file into a `Spec` or raises `SpecError` with every problem of the file.
The schema is declared once, in the tables below; docs/spec.md documents it field by field.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import keyword
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .diagnostics import Diagnostic, Position, SpecError
from .yaml_source import MAX_SPEC_BYTES, Located, load_located, too_large

# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------

SHAPES = {
    ("B", "T", "H"): "per token, per head",
    ("B", "T", "H", "K"): "per token, per head, per key channel",
    ("H",): "per head (a fixed value)",
    ("H", "K"): "per head, per key channel (a fixed value)",
}

ROLES = {
    "log_decay": "a forgetting gate in natural-log space, g = log(alpha) <= 0",
    "step_size": "a test-time learning rate beta > 0",
    "sample_weight": "a weight on the newest sample's loss (an input gate)",
    "ridge": "a ridge (L2) coefficient lambda > 0",
    "forget": "a fraction alpha in [0, 1] of the memory forgotten per token",
    "momentum": "a momentum coefficient eta in [0, 1]",
    "norm_weight": "a layer norm's per-channel scale (fixed per head)",
    "norm_bias": "a layer norm's per-channel shift (fixed per head)",
}
# Names a generated op's signature or body already uses.
RESERVED_INPUT_NAMES = ("q", "k", "v", "scale", "initial_state", "output_final_state", "cu_seqlens", "chunk_size",
                        "torch", "triton", "tl", "dtype", "output_gate")
# Roles that make the memory forget (or carry) its past: what strongly decaying gates stress.
GATE_ROLES = ("log_decay", "forget", "momentum")

REGRESSORS = {
    "linear": "m(k) = S^T k, S in R^{K x V}",
    "affine": "m(k) = W k + b, solved exactly with global weights",
    "local_polynomial": "a polynomial in (k - q) of degree 0, 1 or 2, fitted per query; outputs its value at q",
    "kernel_ridge": "kernel ridge regression over the prefix (a reproducing-kernel Hilbert space)",
    "mlp": "a fast-weight network m(k) = [k +] LN(MLP(k)), trained by mini-batch gradient descent",
}
# class -> {option: description}
REGRESSOR_OPTIONS = {
    "linear": {},
    "affine": {},
    "local_polynomial": {"degree": "0 (local constant), 1 (local linear) or 2"},
    "kernel_ridge": {"kernel": "gaussian or exp_dot", "bandwidth": "h of the Gaussian kernel"},
    "mlp": {"depth": "1 to 4 linear layers", "hidden": "the hidden layers' width as a multiple of K (depth >= 2)",
            "activation": "between the layers: gelu_tanh or silu", "bias": "true: each layer adds a bias",
            "residual": "true: m(k) = k + g(k), g fitted to v - k",
            "layer_norm": "{weight: input, bias: input}: g ends in a layer norm"},
}
ACTIVATIONS = {"gelu_tanh": "GELU, tanh approximation", "silu": "x sigmoid(x)"}
KERNELS = {
    "exp_dot": "s(k, q) = exp(scale * q.k): softmax attention's kernel",
    "gaussian": "s(k, q) = exp(-scale * ||q - k||^2 / 2), scale = 1 / bandwidth by default",
}
NONPARAMETRIC = ("local_polynomial", "kernel_ridge")

# method -> {option: (kind, required)}; kinds: "input:<roles>", "number_or_input:<roles>", "count"
METHODS: dict[str, dict[str, tuple[str, bool]]] = {
    "gradient_step_from_zero": {},
    # ridge: required except for local constant regression; solver: how the per-query K x K system is solved
    "exact": {"ridge": ("number_or_input:ridge", False), "solver": ("solver", False)},
    "recursive_least_squares": {"ridge": ("number", True)},
    "online_gradient_step": {
        "step_size": ("input:step_size", True),
        "weight_decay": ("input:log_decay,forget", False),
        "steps_per_token": ("count", False),
    },
    "implicit_step": {"step_size": ("input:step_size", True)},
    "momentum": {
        "step_size": ("input:step_size", True),
        "momentum": ("input:momentum", True),
        "weight_decay": ("input:log_decay,forget", False),
    },
    "minibatch_gd": {
        "batch_size": ("batch", True),
        "step_size": ("input:step_size", True),
        "step_size_per": ("choice:sample,row", False),
        "momentum": ("input:momentum", False),
        "weight_decay": ("input:forget", False),
    },
}

# Methods that accept decay in their regression weights, and which decay shapes each takes.
DECAY_SHAPES = {
    "gradient_step_from_zero": {("B", "T", "H"), ("B", "T", "H", "K"), ("H",)},
    "online_gradient_step": {("B", "T", "H"), ("B", "T", "H", "K"), ("H",)},
    "implicit_step": {("B", "T", "H"), ("B", "T", "H", "K"), ("H",)},
    "exact": {("B", "T", "H"), ("H",)},
    "recursive_least_squares": {("B", "T", "H"), ("H",)},
    "momentum": set(),
    "minibatch_gd": set(),
}
SAMPLE_WEIGHT_METHODS = {"gradient_step_from_zero", "exact"}
RESIDUAL_READOUTS = {
    "input": "o = q + g(q), the fitted function itself",
    "pre_norm": "o = z + LN(z) with z the last layer's output at q (fla-core's TTT-Linear)",
}
NORMALISERS = {"none": "o = S^T (scale q)", "sum": "o = S^T (scale q) / (z^T (scale q)), z the weighted key sum"}

TOP_LEVEL = {
    "name": "the layer's name: generated/<name>/, naive_<name>, chunk_<name>",
    "description": "one line shown by `ttr list` and in the generated docstrings",
    "inputs": "inputs beyond q, k, v, in call order",
    "weights": "the regression weights gamma_i^(t)",
    "regressor": "the regressor function class",
    "optimiser": "the test-time optimiser",
    "readout": "how the memory is read with the query",
    "schedule": "kernel schedule (chunk and block sizes); never changes the math",
}
REQUIRED_TOP_LEVEL = ("name", "regressor", "optimiser")


# ---------------------------------------------------------------------------------------------
# The validated model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[str, ...]
    role: str

    @property
    def per_token(self) -> bool:
        return self.shape[:2] == ("B", "T")

    @property
    def per_key(self) -> bool:
        return self.shape[-1] == "K"


@dataclass(frozen=True)
class Weights:
    decay: str | None = None  # name of a log_decay input
    sample_weight: str | None = None  # name of a sample_weight input
    kernel: str | None = None  # query-local weights s(k_i, q_t), see KERNELS
    bandwidth: float | None = None  # of the Gaussian kernel
    window: int | None = None  # sliding window: only the last `window` keys get weight


@dataclass(frozen=True)
class Regressor:
    cls: str = "linear"
    degree: int | None = None  # local_polynomial
    kernel: str | None = None  # kernel_ridge
    bandwidth: float | None = None  # kernel_ridge with a Gaussian kernel
    depth: int = 1  # mlp: linear layers
    hidden: int | None = None  # mlp of depth >= 2: hidden width / K
    activation: str | None = None  # mlp of depth >= 2: see ACTIVATIONS
    bias: bool = False  # mlp
    residual: bool = False  # mlp: m(k) = k + g(k)
    norm_weight: str | None = None  # mlp ending in a layer norm: its inputs
    norm_bias: str | None = None

    @property
    def nonparametric(self) -> bool:
        return self.cls in NONPARAMETRIC


@dataclass(frozen=True)
class Optimiser:
    method: str
    step_size: str | None = None
    weight_decay: str | None = None
    momentum: str | None = None
    ridge: float | str | None = None
    steps_per_token: int = 1
    batch_size: int | None = None  # minibatch_gd: gradients at the weights of the mini-batch start
    step_size_per: str = "sample"  # minibatch_gd: "row" scales the mini-batch's gradient sum by the reading row's rate
    solver: str = "exact"  # the per-query K x K system (ridge solution, local-linear fit): "exact" or "cg"
    solver_iterations: int | None = None  # cg: the number of steps from x = 0

    @property
    def summary(self) -> str:
        """The method, with an iterative solver's steps: e.g. 'exact' or 'exact, cg x 30'."""
        return self.method + (f", cg x {self.solver_iterations}" if self.solver == "cg" else "")


@dataclass(frozen=True)
class Readout:
    scale: float | None = None  # None: K ** -0.5
    normalise: str = "none"
    residual: str = "input"  # mlp with residual and layer norm: "pre_norm" reads z + LN(z) (fla's TTT-Linear)


@dataclass(frozen=True)
class Schedule:
    chunk_size: int = 64
    block_k: int | None = None
    block_v: int | None = None


@dataclass(frozen=True)
class Spec:
    name: str
    description: str
    inputs: tuple[InputSpec, ...]
    weights: Weights
    regressor: Regressor
    optimiser: Optimiser
    readout: Readout
    schedule: Schedule
    path: str = "<spec>"
    positions: dict[str, Position] = field(default_factory=dict, compare=False, hash=False)

    def input(self, name: str) -> InputSpec:
        return next(i for i in self.inputs if i.name == name)

    def with_input_names(self, names: dict[str, str]) -> Spec:
        """The same spec with inputs renamed (names: old -> new), declarations and references alike."""
        def new(name):
            return names.get(name, name) if isinstance(name, str) else name

        return replace(
            self, inputs=tuple(replace(i, name=new(i.name)) for i in self.inputs),
            weights=replace(self.weights, decay=new(self.weights.decay), sample_weight=new(self.weights.sample_weight)),
            regressor=replace(self.regressor, norm_weight=new(self.regressor.norm_weight),
                              norm_bias=new(self.regressor.norm_bias)),
            optimiser=replace(self.optimiser, step_size=new(self.optimiser.step_size),
                              weight_decay=new(self.optimiser.weight_decay), momentum=new(self.optimiser.momentum),
                              ridge=new(self.optimiser.ridge)),
            positions={(f"inputs.{new(k.split('.')[1])}" + k[len("inputs.") + len(k.split('.')[1]):]
                        if k.startswith("inputs.") else k): p for k, p in self.positions.items()})

    @property
    def docstring_description(self) -> str:
        """The description as it may stand inside a generated docstring: quotes and backslashes escaped, so no
        text of the spec can end the docstring and become code."""
        return self.description.replace("\\", "\\\\").replace('"', '\\"')

    @property
    def camel_name(self) -> str:
        return "".join(part.capitalize() for part in self.name.split("_"))

    def math_dict(self) -> dict:
        """Everything that determines the update rule (the schedule is left out on purpose)."""
        return {
            "inputs": [[i.name, list(i.shape), i.role] for i in self.inputs],
            "weights": [self.weights.decay, self.weights.sample_weight, self.weights.kernel,
                        self.weights.bandwidth, self.weights.window],
            "regressor": [self.regressor.cls, self.regressor.degree, self.regressor.kernel, self.regressor.bandwidth,
                          self.regressor.depth, self.regressor.hidden, self.regressor.activation, self.regressor.bias,
                          self.regressor.residual, self.regressor.norm_weight, self.regressor.norm_bias],
            "optimiser": [self.optimiser.method, self.optimiser.step_size, self.optimiser.weight_decay,
                          self.optimiser.momentum, self.optimiser.ridge, self.optimiser.steps_per_token,
                          self.optimiser.batch_size, self.optimiser.step_size_per]
            + ([self.optimiser.solver, self.optimiser.solver_iterations] if self.optimiser.solver != "exact" else []),
            "readout": [self.readout.scale, self.readout.normalise, self.readout.residual],
        }

    def math_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.math_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def position_of(self, field_path: str) -> Position:
        while field_path and field_path not in self.positions:
            field_path = field_path.rpartition(".")[0]
        return self.positions.get(field_path, Position(1, 1))


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


class _Checker:
    """Collects diagnostics while reading a Located tree; never stops at the first problem."""

    def __init__(self, path: str):
        self.path = path
        self.diagnostics: list[Diagnostic] = []
        self.positions: dict[str, Position] = {}
        self.suggested: set[str] = set()  # field paths offered as "did you mean" for a misspelt key

    def error(self, node_or_pos, field_path: str, message: str, hint: str = "") -> None:
        position = node_or_pos.position if isinstance(node_or_pos, Located) else node_or_pos
        self.diagnostics.append(Diagnostic(self.path, position, field_path, message, hint))

    def mapping(self, node: Located, field_path: str, allowed: dict[str, str]) -> dict[str, Located]:
        if not isinstance(node.value, dict):
            self.error(node, field_path, f"expected a mapping, got {_describe(node.value)}",
                       "write it as 'key: value' lines, see docs/spec.md")
            return {}
        self.positions[field_path] = node.position
        known = {}
        for key, child in node.value.items():
            child_path = f"{field_path}.{key}" if field_path else key
            key_position = node.key_positions[key]
            if key not in allowed:
                close = difflib.get_close_matches(key, list(allowed), n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(allowed)}"
                self.error(key_position, child_path, f"unknown key '{key}'", hint)
                if close:
                    self.suggested.add(f"{field_path}.{close[0]}" if field_path else close[0])
                continue
            self.positions[child_path] = key_position
            known[key] = child
        return known

    def string(self, node: Located, field_path: str) -> str | None:
        if isinstance(node.value, str):
            return node.value
        self.error(node, field_path, f"expected a string, got {_describe(node.value)}", "write a plain word")
        return None

    def integer(self, node: Located, field_path: str, low: int, high: int, example: str) -> int | None:
        """An integer from low to high, or None with a diagnostic (example: how to write one)."""
        value = node.value
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        self.error(node, field_path, f"expected an integer from {low} to {high}, got {_describe(value)}",
                   f"write e.g. '{example}'")
        return None

    def choice(self, node: Located, field_path: str, choices, what: str) -> str | None:
        value = self.string(node, field_path)
        if value is None:
            return None
        if value not in choices:
            close = difflib.get_close_matches(value, list(choices), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"choose one of: {', '.join(choices)}"
            self.error(node, field_path, f"unknown {what} '{value}'", hint)
            return None
        return value


def _describe(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:  # before reading a huge file whole
            raise too_large(str(path))
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SpecError([Diagnostic(str(path), Position(1, 1), "", f"cannot read the spec: {error.strerror}",
                                    "check the path")]) from None
    except UnicodeDecodeError as error:
        raise SpecError([Diagnostic(str(path), Position(1, 1), "", f"the spec is not UTF-8 text (byte {error.start})",
                                    "a spec is a YAML text file; check that this is the right file")]) from None
    return parse_spec(text, str(path))


def parse_spec(text: str, path: str = "<spec>") -> Spec:
    root = load_located(text, path)
    check = _Checker(path)
    top = check.mapping(root, "", TOP_LEVEL)
    for key in REQUIRED_TOP_LEVEL:
        if key not in top and isinstance(root.value, dict) and key not in check.suggested:
            check.error(root, key, "missing required key", f"add '{key}:' (see docs/spec.md)")

    name = _check_name(check, top.get("name"))
    description = ""
    if "description" in top:
        description = check.string(top["description"], "description") or ""
        if not (len(description) <= 300 and description.isprintable()):
            check.error(top["description"], "description", "expected one line of at most 300 printable characters",
                        "write a one-line description")
            description = ""
    inputs = _check_inputs(check, top.get("inputs"))
    by_name = {i.name: i for i in inputs}
    used: set[str] = set()

    def reference(node: Located, field_path: str, roles: tuple[str, ...]) -> str | None:
        """A reference to a declared input, with one of the given roles."""
        ref = check.string(node, field_path)
        if ref is None:
            return None
        if ref not in by_name:
            declared = ", ".join(by_name) or "none declared"
            check.error(node, field_path, f"input '{ref}' is not declared",
                        f"declare it under 'inputs:' with role {' or '.join(roles)} (declared: {declared})")
            return None
        used.add(ref)
        if by_name[ref].role not in roles:
            check.error(node, field_path, f"input '{ref}' has role '{by_name[ref].role}'",
                        f"use an input with role {' or '.join(roles)}")
            return None
        return ref

    weights = _check_weights(check, top.get("weights"), reference)
    regressor = _check_regressor(check, top.get("regressor"), reference)
    optimiser = _check_optimiser(check, top.get("optimiser"), reference)
    readout = _check_readout(check, top.get("readout"), regressor)
    schedule = _check_schedule(check, top.get("schedule"))

    if optimiser is not None:
        _check_combination(check, by_name, weights, optimiser, readout, regressor)
        if schedule.chunk_size % optimiser.steps_per_token:  # a chunk holds whole tokens' sub-steps
            check.error(check.positions["optimiser.steps_per_token"], "optimiser.steps_per_token",
                        f"{optimiser.steps_per_token} steps per token do not divide the chunk size {schedule.chunk_size}",
                        "use 1, 2, 4 or 8 steps per token (chunk sizes are powers of two)")
    for i in inputs:
        if i.name not in used:
            check.error(check.positions.get(f"inputs.{i.name}", root.position), f"inputs.{i.name}",
                        f"input '{i.name}' is declared but never used",
                        "bind it in 'weights' or 'optimiser', or remove it")

    if check.diagnostics:
        raise SpecError(sorted(check.diagnostics, key=lambda d: (d.position.line, d.position.column)))
    return Spec(name, description, tuple(inputs), weights, regressor, optimiser, readout, schedule,
                path=path, positions=check.positions)


def _check_name(check: _Checker, node: Located | None) -> str:
    if node is None:
        return ""
    name = check.string(node, "name")
    if name is not None and (not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", name) or keyword.iskeyword(name)):
        shown = name if len(name) <= 40 else name[:40] + "..."
        check.error(node, "name", f"{shown!r} is not a valid layer name",
                    "use 1 to 64 lower_snake_case letters, digits and underscores, starting with a letter")
    return name or ""


def _check_inputs(check: _Checker, node: Located | None) -> list[InputSpec]:
    if node is None:
        return []
    if node.value is None:
        return []
    if not isinstance(node.value, dict):
        check.error(node, "inputs", f"expected a mapping of input names, got {_describe(node.value)}",
                    "write 'inputs:' then one 'name: {shape: [B, T, H], role: step_size}' line per input")
        return []
    inputs = []
    for input_name, child in node.value.items():
        field_path = f"inputs.{input_name}"
        check.positions[field_path] = node.key_positions[input_name]
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", input_name) or input_name in RESERVED_INPUT_NAMES:
            check.error(node.key_positions[input_name], field_path, f"'{input_name}' cannot name an input",
                        f"use a lower_snake_case name other than {', '.join(RESERVED_INPUT_NAMES)}")
            continue
        fields = check.mapping(child, field_path, {"shape": "the tensor shape", "role": "what the input means"})
        shape, role = None, None
        if "shape" in fields:
            raw = fields["shape"].plain()
            if isinstance(raw, list) and tuple(raw) in SHAPES:
                shape = tuple(raw)
            else:
                allowed = "; ".join(f"[{', '.join(s)}] ({d})" for s, d in SHAPES.items())
                shown = "[" + ", ".join(map(str, raw)) + "]" if isinstance(raw, list) else repr(raw)
                check.error(fields["shape"], f"{field_path}.shape", f"unsupported shape {shown}",
                            f"use one of {allowed}")
        else:
            check.error(child, f"{field_path}.shape", "missing required key", "add 'shape: [B, T, H]' or similar")
        if "role" in fields:
            role = check.choice(fields["role"], f"{field_path}.role", ROLES, "role")
        else:
            check.error(child, f"{field_path}.role", "missing required key",
                        f"add 'role:', one of {', '.join(ROLES)}")
        if shape and role:
            inputs.append(InputSpec(input_name, shape, role))
    return inputs


def _check_weights(check: _Checker, node: Located | None, reference) -> Weights:
    if node is None or node.value == "uniform":
        return Weights()
    if isinstance(node.value, str):
        check.error(node, "weights", f"unknown weights '{node.value}'",
                    "write 'uniform', or a mapping with 'decay:', 'sample_weight:', 'kernel:', 'window:'")
        return Weights()
    fields = check.mapping(node, "weights", {
        "decay": "a log_decay input", "sample_weight": "a sample_weight input", "kernel": "query-local weights",
        "bandwidth": "of the Gaussian kernel", "window": "sliding-window length"})
    decay = reference(fields["decay"], "weights.decay", ("log_decay",)) if "decay" in fields else None
    sample = (reference(fields["sample_weight"], "weights.sample_weight", ("sample_weight",))
              if "sample_weight" in fields else None)
    kernel = check.choice(fields["kernel"], "weights.kernel", KERNELS, "kernel") if "kernel" in fields else None
    bandwidth = _positive_number(check, fields.get("bandwidth"), "weights.bandwidth")
    window = None
    if "window" in fields:
        value = fields["window"].value
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            window = value
        else:
            check.error(fields["window"], "weights.window", f"expected a positive integer, got {_describe(value)}",
                        "write e.g. 'window: 64'")
    if kernel == "gaussian" and bandwidth is None and "kernel" in fields:
        check.error(fields["kernel"], "weights.bandwidth", "the Gaussian kernel needs a bandwidth",
                    "add 'bandwidth: 8.0' under 'weights'")
    if bandwidth is not None and kernel != "gaussian":
        check.error(fields["bandwidth"], "weights.bandwidth", "a bandwidth only applies to 'kernel: gaussian'",
                    "remove it, or set 'kernel: gaussian'")
    if window is not None and kernel is None:
        check.error(fields["window"], "weights.window", "a sliding window needs query-local weights",
                    "add 'kernel: exp_dot' (softmax attention) or remove 'window'")
    return Weights(decay, sample, kernel, bandwidth, window)


def _positive_number(check: _Checker, node: Located | None, field_path: str) -> float | None:
    if node is None:
        return None
    if _is_number(node.value) and node.value > 0:
        return float(node.value)
    check.error(node, field_path, f"expected a positive number, got {_describe(node.value)}", "write e.g. '8.0'")
    return None


def _check_regressor(check: _Checker, node: Located | None, reference) -> Regressor:
    if node is None:
        return Regressor()
    value = node.value
    fields: dict[str, Located] = {}
    if isinstance(value, dict):
        allowed = {"class": "the regressor class"} | {o: "" for opts in REGRESSOR_OPTIONS.values() for o in opts}
        fields = check.mapping(node, "regressor", allowed)
        if "class" not in fields:
            check.error(node, "regressor.class", "missing required key", f"add 'class:', one of {', '.join(REGRESSORS)}")
            return Regressor()
        node, value = fields["class"], fields["class"].value
    cls = check.choice(node, "regressor", REGRESSORS, "regressor class")
    if cls is None:
        return Regressor()
    options = {}
    for option, child in fields.items():
        if option == "class":
            continue
        field_path = f"regressor.{option}"
        if option not in REGRESSOR_OPTIONS[cls]:
            takes = ", ".join(REGRESSOR_OPTIONS[cls]) or "no options"
            check.error(check.positions[field_path], field_path, f"class '{cls}' takes no option '{option}'",
                        f"'{cls}' takes: {takes}")
        elif option == "degree":
            if child.value in (0, 1, 2) and not isinstance(child.value, bool):
                options["degree"] = child.value
            else:
                check.error(child, field_path, f"expected 0, 1 or 2, got {_describe(child.value)}",
                            "degree 0 is softmax-like attention, 1 local linear, 2 local quadratic")
        elif option == "kernel":
            options["kernel"] = check.choice(child, field_path, KERNELS, "kernel")
        elif option == "bandwidth":
            options["bandwidth"] = _positive_number(check, child, field_path)
        elif option in ("depth", "hidden"):
            high, example = (4, "depth: 2") if option == "depth" else (8, "hidden: 4")
            if (count := check.integer(child, field_path, 1, high, example)) is not None:
                options[option] = count
        elif option == "activation":
            options["activation"] = check.choice(child, field_path, ACTIVATIONS, "activation")
        elif option in ("bias", "residual"):
            if isinstance(child.value, bool):
                options[option] = child.value
            else:
                check.error(child, field_path, f"expected true or false, got {_describe(child.value)}",
                            f"write '{option}: true'")
        elif option == "layer_norm":
            norm = check.mapping(child, field_path, {"weight": "a norm_weight input", "bias": "a norm_bias input"})
            for part, role in (("weight", "norm_weight"), ("bias", "norm_bias")):
                if part in norm:
                    options[role] = reference(norm[part], f"{field_path}.{part}", (role,))
                elif isinstance(child.value, dict):
                    check.error(child, f"{field_path}.{part}", "missing required key",
                                f"add '{part}:', an input of shape [H, K] with role {role}")
    if cls == "local_polynomial" and "degree" not in fields:
        check.error(node, "regressor.degree", "class 'local_polynomial' needs 'degree'", "add 'degree: 1'")
    if cls == "kernel_ridge":
        if "kernel" not in fields:
            check.error(node, "regressor.kernel", "class 'kernel_ridge' needs 'kernel'", "add 'kernel: gaussian'")
        elif options.get("kernel") == "gaussian" and "bandwidth" not in fields:
            check.error(fields["kernel"], "regressor.bandwidth", "the Gaussian kernel needs a bandwidth",
                        "add 'bandwidth: 4.0' under 'regressor'")
    if cls == "mlp":
        _check_mlp(check, node, fields, options)
    return Regressor(cls, **options)


def _check_mlp(check: _Checker, node: Located, fields: dict[str, Located], options: dict) -> None:
    depth = options.get("depth", 1)
    if depth >= 2:
        for option, example in (("hidden", "hidden: 4"), ("activation", "activation: gelu_tanh")):
            if option not in fields:
                check.error(node, f"regressor.{option}", f"an mlp of depth {depth} needs '{option}'", f"add '{example}'")
    else:
        for option in ("hidden", "activation"):
            if option in fields:
                check.error(fields[option], f"regressor.{option}", f"'{option}' applies to an mlp of depth 2 or more",
                            "remove it, or set 'depth: 2'")


def _check_optimiser(check: _Checker, node: Located | None, reference) -> Optimiser | None:
    if node is None:
        return None
    if isinstance(node.value, str):
        node = Located({"method": node}, node.position, {"method": node.position})
    allowed = {"method": "the optimiser"} | {opt: "" for options in METHODS.values() for opt in options}
    fields = check.mapping(node, "optimiser", allowed)
    if "method" not in fields:
        if isinstance(node.value, dict):
            check.error(node, "optimiser.method", "missing required key", f"add 'method:', one of {', '.join(METHODS)}")
        return None
    method = check.choice(fields["method"], "optimiser.method", METHODS, "optimiser method")
    if method is None:
        return None
    options = METHODS[method]
    values: dict[str, object] = {}
    for option, child in fields.items():
        if option == "method":
            continue
        field_path = f"optimiser.{option}"
        if option not in options:
            takes = ", ".join(options) or "no options"
            check.error(check.positions[field_path], field_path, f"method '{method}' takes no option '{option}'",
                        f"'{method}' takes: {takes}")
            continue
        kind, _ = options[option]
        if kind in ("batch", "count"):
            high, example = (256, "batch_size: 16") if kind == "batch" else (8, "steps_per_token: 2")
            if (count := check.integer(child, field_path, 1, high, example)) is not None:
                values[option] = count
        elif kind == "solver":
            values["solver"], values["solver_iterations"] = _check_solver(check, child)
        elif kind.startswith("choice:"):
            values[option] = check.choice(child, field_path, kind.split(":")[1].split(","), option) or "sample"
        elif kind == "number" or (kind.startswith("number_or_input") and _is_number(child.value)):
            if _is_number(child.value) and child.value > 0:
                values[option] = float(child.value)
            else:
                check.error(child, field_path, f"expected a positive number, got {_describe(child.value)}",
                            "write e.g. 'ridge: 1.0'")
        else:
            roles = tuple(kind.split(":")[1].split(","))
            values[option] = reference(child, field_path, roles)
    for option, (kind, required) in options.items():
        if required and option not in fields:
            check.error(node, f"optimiser.{option}", f"method '{method}' needs '{option}'",
                        f"add '{option}:' ({kind.replace('input:', 'an input with role ').replace('number_or_input:', 'a number or an input with role ')})")
    return Optimiser(method, **values)


def _check_solver(check: _Checker, node: Located) -> tuple[str, int | None]:
    """optimiser.solver: 'exact', or {method: cg, iterations: n} (n conjugate-gradient steps from zero)."""
    if node.value == "exact":
        return "exact", None
    if not isinstance(node.value, dict):
        check.error(node, "optimiser.solver", f"expected 'exact' or a mapping, got {_describe(node.value)}",
                    "write 'solver: exact' or 'solver: {method: cg, iterations: 16}'")
        return "exact", None
    fields = check.mapping(node, "optimiser.solver", {"method": "the solver", "iterations": "conjugate-gradient steps"})
    if "method" not in fields:
        check.error(node, "optimiser.solver.method", "missing required key", "add 'method: cg' or 'method: exact'")
        return "exact", None
    method = check.choice(fields["method"], "optimiser.solver.method", ("exact", "cg"), "solver")
    if method == "cg":
        if "iterations" not in fields:
            check.error(node, "optimiser.solver.iterations", "the cg solver needs 'iterations'", "add 'iterations: 16'")
            return "exact", None
        iterations = check.integer(fields["iterations"], "optimiser.solver.iterations", 1, 256, "iterations: 16")
        return ("cg", iterations) if iterations is not None else ("exact", None)
    if "iterations" in fields:
        check.error(fields["iterations"], "optimiser.solver.iterations", "the exact solver takes no iterations",
                    "remove 'iterations', or set 'method: cg'")
    return "exact", None


def _check_readout(check: _Checker, node: Located | None, regressor: Regressor) -> Readout:
    if node is None:
        return Readout()
    fields = check.mapping(node, "readout", {"scale": "query scale", "normalise": "output normalisation",
                                             "residual": "what an mlp memory's residual adds at the query"})
    scale = None
    if "scale" in fields:
        value = fields["scale"].value
        if _is_number(value) and value > 0:
            scale = float(value)
        elif value != "default":
            check.error(fields["scale"], "readout.scale", f"expected 'default' or a positive number, got {_describe(value)}",
                        "write 'scale: default' (K ** -0.5) or e.g. 'scale: 1.0'")
    normalise = "none"
    if "normalise" in fields:
        normalise = check.choice(fields["normalise"], "readout.normalise", NORMALISERS, "normalisation") or "none"
    residual = "input"
    if "residual" in fields:
        residual = check.choice(fields["residual"], "readout.residual", RESIDUAL_READOUTS, "residual read-out") or "input"
        if not (regressor.cls == "mlp" and regressor.residual and regressor.norm_weight):
            check.error(fields["residual"], "readout.residual",
                        "a residual read-out needs an mlp regressor with 'residual: true' and a 'layer_norm'",
                        "remove 'readout.residual'")
    return Readout(scale, normalise, residual)


def _check_schedule(check: _Checker, node: Located | None) -> Schedule:
    if node is None:
        return Schedule()
    fields = check.mapping(node, "schedule", {"chunk_size": "", "block_k": "", "block_v": ""})
    values = {}
    for key, child in fields.items():
        value = child.value
        if not (isinstance(value, int) and not isinstance(value, bool) and 16 <= value <= 256
                and value & (value - 1) == 0):
            check.error(child, f"schedule.{key}", f"expected a power of two from 16 to 256, got {_describe(value)}",
                        f"write e.g. '{key}: 64'")
            continue
        values[key] = value
    return Schedule(**values)


def _check_combination(check: _Checker, by_name: dict[str, InputSpec], weights: Weights,
                       optimiser: Optimiser, readout: Readout, regressor: Regressor) -> None:
    """Choices that are valid alone but that the derivation cannot combine."""
    method = optimiser.method
    _check_regressor_combination(check, by_name, weights, optimiser, regressor)
    if weights.decay and weights.decay in by_name:
        shape = by_name[weights.decay].shape
        if shape not in DECAY_SHAPES[method]:
            takes = [f"[{', '.join(s)}]" for s in sorted(DECAY_SHAPES[method])]
            check.error(check.positions["weights.decay"], "weights.decay",
                        f"method '{method}' cannot take a decay of shape [{', '.join(shape)}]",
                        f"use a decay of shape {' or '.join(takes)}" if takes else
                        "momentum forgets through 'optimiser.weight_decay'; remove 'weights.decay'")
    if weights.sample_weight and method not in SAMPLE_WEIGHT_METHODS:
        check.error(check.positions["weights.sample_weight"], "weights.sample_weight",
                    f"method '{method}' does not take per-sample weights",
                    f"per-sample weights work with {' and '.join(sorted(SAMPLE_WEIGHT_METHODS))}; "
                    "for a step size use 'optimiser.step_size'")
    if readout.normalise == "sum" and method != "gradient_step_from_zero":
        check.error(check.positions["readout.normalise"], "readout.normalise",
                    f"normalise: sum needs method 'gradient_step_from_zero', not '{method}'",
                    "remove 'normalise' or change the method")
    if weights.decay and optimiser.steps_per_token > 1 and weights.decay in by_name \
            and not by_name[weights.decay].per_token:
        # A decay acts once per token, at its first sub-step: a fixed per-head one is not spread over them yet.
        check.error(check.positions["optimiser.steps_per_token"], "optimiser.steps_per_token",
                    "a fixed per-head decay ([H]) with several steps per token is not supported yet",
                    "use a decay of shape [B, T, H], or set 'steps_per_token: 1'")
    if weights.decay and optimiser.weight_decay:
        check.error(check.positions["optimiser.weight_decay"], "optimiser.weight_decay",
                    "both 'weights.decay' and 'optimiser.weight_decay' forget the memory",
                    "keep one of the two")
    ridge = optimiser.ridge
    if isinstance(ridge, str) and ridge in by_name and by_name[ridge].per_token:
        check.error(check.positions["optimiser.ridge"], "optimiser.ridge",
                    "the ridge must be fixed per head: shape [H] or [H, K]", "declare it with shape [H, K]")
    for i in by_name.values():
        if i.role in ("norm_weight", "norm_bias") and i.shape != ("H", "K"):
            check.error(check.positions.get(f"inputs.{i.name}", Position(1, 1)), f"inputs.{i.name}.shape",
                        f"input '{i.name}' ({i.role}) is fixed per head and channel", "use shape [H, K]")
    step = by_name.get(optimiser.step_size) if optimiser.step_size else None
    step_per_key = step is not None and step.shape == ("B", "T", "H", "K")
    if step_per_key:
        # A step per key channel is a diagonal preconditioner on the online gradient step.
        if method != "online_gradient_step":
            check.error(check.positions.get(f"inputs.{step.name}", Position(1, 1)), f"inputs.{step.name}.shape",
                        f"a step size per key channel ([B, T, H, K]) preconditions 'online_gradient_step', not "
                        f"'{method}'", "use shape [B, T, H], or method 'online_gradient_step'")
        elif optimiser.weight_decay:
            check.error(check.positions["optimiser.weight_decay"], "optimiser.weight_decay",
                        "a step size per key channel does not combine with 'weight_decay' yet",
                        "forget through 'weights.decay' (decay, then the step), or use a step of shape [B, T, H]")
    for ref in (optimiser.step_size, optimiser.momentum, optimiser.weight_decay, weights.sample_weight):
        if ref == optimiser.step_size and step_per_key:
            continue  # checked above
        if ref and ref in by_name and by_name[ref].shape != ("B", "T", "H"):
            check.error(check.positions.get(f"inputs.{ref}", Position(1, 1)), f"inputs.{ref}.shape",
                        f"input '{ref}' ({by_name[ref].role}) must be one number per token and head",
                        "use shape [B, T, H]; for a value fixed per head, pass it repeated over B and T")


def _check_regressor_combination(check: _Checker, by_name: dict[str, InputSpec], weights: Weights,
                                 optimiser: Optimiser, regressor: Regressor) -> None:
    where = check.positions.get("regressor.class", check.positions.get("regressor", Position(1, 1)))
    if (regressor.cls == "mlp") != (optimiser.method == "minibatch_gd"):
        if regressor.cls == "mlp":
            check.error(check.positions.get("optimiser.method", where), "optimiser.method",
                        f"class 'mlp' is trained by 'minibatch_gd', not by '{optimiser.method}'",
                        "write 'optimiser: {method: minibatch_gd, batch_size: 16, step_size: ...}'")
        else:
            check.error(check.positions.get("optimiser.method", where), "optimiser.method",
                        f"method 'minibatch_gd' trains class 'mlp', not '{regressor.cls}'",
                        "set 'regressor: {class: mlp, depth: 1}', or use 'online_gradient_step' for a linear memory")
        return
    if optimiser.method == "minibatch_gd" and optimiser.step_size_per == "row" and (
            optimiser.momentum or optimiser.weight_decay):
        check.error(check.positions["optimiser.step_size_per"], "optimiser.step_size_per",
                    "a row's rate scales the mini-batch's gradient sum only without momentum and weight decay",
                    "remove 'momentum' and 'weight_decay', or set 'step_size_per: sample'")
    if regressor.cls not in ("linear", "mlp") and optimiser.method != "exact":
        check.error(check.positions.get("optimiser.method", check.positions.get("optimiser", where)),
                    "optimiser.method", f"class '{regressor.cls}' is solved exactly, not by '{optimiser.method}'",
                    "write 'optimiser: {method: exact, ridge: ...}'")
    needs_ridge = regressor.cls != "linear" and not (regressor.cls == "local_polynomial" and regressor.degree == 0)
    ridge_written = "optimiser.ridge" in check.positions  # present, if perhaps invalid (reported already)
    if optimiser.method == "exact" and not ridge_written and (needs_ridge or regressor.cls == "linear"):
        check.error(check.positions.get("optimiser", where), "optimiser.ridge",
                    f"method 'exact' needs 'ridge' for class '{regressor.cls}'", "add 'ridge: 0.1'")
    if regressor.nonparametric and isinstance(optimiser.ridge, str):
        check.error(check.positions["optimiser.ridge"], "optimiser.ridge",
                    f"class '{regressor.cls}' takes a fixed number as ridge", "write e.g. 'ridge: 0.1'")
    if regressor.cls == "local_polynomial" and weights.kernel is None:
        check.error(where, "weights.kernel", "local polynomial regression needs query-local weights",
                    "add 'weights: {kernel: exp_dot}' (softmax attention's kernel) or 'kernel: gaussian'")
    if weights.kernel is not None and regressor.cls != "local_polynomial":
        check.error(check.positions["weights.kernel"], "weights.kernel",
                    f"query-local weights need class 'local_polynomial', not '{regressor.cls}'",
                    "set 'regressor: {class: local_polynomial, degree: 0}' or remove 'kernel'")
    # The solver acts on a per-query K x K system: the ridge solution's (linear, affine) or a local-linear fit's.
    if optimiser.solver != "exact" and not (regressor.cls in ("linear", "affine")
                                            or (regressor.cls == "local_polynomial" and regressor.degree == 1)):
        check.error(check.positions["optimiser.solver"], "optimiser.solver",
                    "an iterative solver applies to a K x K system: a linear or affine memory's ridge solution, "
                    "or a local-linear fit",
                    "remove 'solver', or set 'regressor: linear', 'regressor: {class: affine}' or "
                    "'regressor: {class: local_polynomial, degree: 1}'")
    if regressor.cls == "kernel_ridge" and weights.sample_weight:
        check.error(check.positions["weights.sample_weight"], "weights.sample_weight",
                    f"class '{regressor.cls}' does not take per-sample weights", "remove 'sample_weight'")
    if regressor.cls == "kernel_ridge" and weights.decay:
        check.error(check.positions["weights.decay"], "weights.decay",
                    "kernel ridge regression here weights the prefix uniformly", "remove 'decay'")
    if regressor.cls in ("local_polynomial", "affine") and weights.decay and weights.decay in by_name:
        if by_name[weights.decay].shape != ("B", "T", "H"):
            check.error(check.positions["weights.decay"], "weights.decay",
                        f"class '{regressor.cls}' takes a decay per token and head",
                        "use a decay of shape [B, T, H]")
