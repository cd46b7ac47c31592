"""Gradients of a nonlinear memory's loss, derived: the chain rule applied to symbols, printed as torch.

A nonlinear regressor (TTT's x + LN(W x + b), a two-layer MLP, Titans' MLP memory) is a short program over
a mini-batch of rows: products with its weight matrices, bias adds, a layer norm's mean and variance,
elementwise activations. Its test-time optimiser needs the gradient of the weighted loss

    L = 1/2 sum_i eta_i ||f(x_i; W) - y_i||^2

with respect to every fast weight, taken at the weights of the mini-batch start. Here that program is
written once as a `Program` (a straight line of operations on named values), walked backwards applying
each operation's vector-Jacobian product, and printed as explicit torch lines: the generated code
computes the gradients with no autograd. An elementwise function (an activation, the layer norm's
1 / sqrt(var + eps)) is a SymPy expression of one symbol, and SymPy differentiates it.

Every value is a tensor `[..., r, c]`: rows `[n, D]`, a column `[n, 1]` (a row's mean), or a vector
`[1, D]` (a bias, a layer norm's weight). A weight matrix is `[..., D_in, D_out]` and acts as x W, the
layout of every state here (S is K x V, read as k^T S). Leading axes (batch, head) are shared, so a weight
may differ per sequence and head, as a fast weight does. Broadcasting follows torch;
the backward sums a gradient over the axes its value was broadcast along.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sympy as sp

from ..render.torch_printer import _ScalarPrinter

X = sp.Symbol("x")  # the argument of an elementwise function

ROWS, COLUMN, VECTOR, MATRIX = "rows", "column", "vector", "matrix"


@dataclass(frozen=True)
class Value:
    name: str
    kind: str  # ROWS, COLUMN, VECTOR or MATRIX


@dataclass(frozen=True)
class Op:
    out: Value
    fn: str  # "linear" (x W), "add", "sub", "mul", "mean" (over the last axis), "apply" (elementwise)
    args: tuple[Value, ...]
    function: sp.Expr | None = None  # for "apply": an expression of X


@dataclass
class Program:
    """A regressor's forward over a mini-batch, built operation by operation."""

    inputs: list[Value] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)

    def input(self, name: str, kind: str) -> Value:
        value = Value(name, kind)
        self.inputs.append(value)
        return value

    def _op(self, name: str, fn: str, args: tuple[Value, ...], kind: str, function=None) -> Value:
        out = Value(name, kind)
        self.ops.append(Op(out, fn, args, function))
        return out

    def linear(self, name: str, x: Value, weight: Value) -> Value:
        return self._op(name, "linear", (x, weight), ROWS)

    def add(self, name: str, a: Value, b: Value) -> Value:
        return self._op(name, "add", (a, b), _broadcast_kind(a.kind, b.kind))

    def sub(self, name: str, a: Value, b: Value) -> Value:
        return self._op(name, "sub", (a, b), _broadcast_kind(a.kind, b.kind))

    def mul(self, name: str, a: Value, b: Value) -> Value:
        return self._op(name, "mul", (a, b), _broadcast_kind(a.kind, b.kind))

    def mean(self, name: str, a: Value) -> Value:
        return self._op(name, "mean", (a,), COLUMN)

    def apply(self, name: str, function: sp.Expr, a: Value) -> Value:
        return self._op(name, "apply", (a,), a.kind, function)

    def layer_norm(self, name: str, z: Value, weight: Value, bias: Value, eps: float) -> Value:
        """LN(z) = (z - mean z) / sqrt(var z + eps) * weight + bias over the last axis, from the primitives
        (its backward then follows from theirs)."""
        centred = self.sub(f"{name}_centred", z, self.mean(f"{name}_mean", z))
        variance = self.mean(f"{name}_var", self.mul(f"{name}_square", centred, centred))
        inv_std = self.apply(f"{name}_inv_std", 1 / sp.sqrt(X + sp.Float(eps)), variance)
        normed = self.mul(f"{name}_hat", centred, inv_std)
        return self.add(name, self.mul(f"{name}_scaled", normed, weight), bias)


def _broadcast_kind(a: str, b: str) -> str:
    kinds = {a, b}
    assert MATRIX not in kinds, "weight matrices enter only through linear"
    if ROWS in kinds or kinds == {COLUMN, VECTOR}:
        return ROWS
    return a


def _reduce(expr: str, kind: str, to: str) -> str:
    """expr (of kind `kind`) summed over the axes along which a value of kind `to` was broadcast."""
    if kind == to:
        return expr
    if to == COLUMN:
        return TORCH.row_sum(expr)
    if to == VECTOR:
        return TORCH.column_sum(expr)
    raise AssertionError(f"cannot reduce {kind} to {to}")


def _grouped(expr: str) -> str:
    """expr, in parentheses unless it is a name or one call (`x.transpose(-1, -2)`, `tl.dot(a, b)`)."""
    head = re.match(r"[A-Za-z_][\w.]*", expr)
    if head is None:
        return f"({expr})"
    rest, depth = expr[head.end():], 0
    for i, char in enumerate(rest):  # a call's parentheses must close at the very end
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and (i == 0 or i + 1 < len(rest)):
            return f"({expr})"
    return expr


class _ElementwisePrinter(_ScalarPrinter):
    """An elementwise function of a tensor: torch's functions, numbers as float literals."""

    def _print_tanh(self, expr):
        return f"torch.tanh({self._print(expr.args[0])})"

    def _print_erf(self, expr):
        return f"torch.erf({self._print(expr.args[0])})"

    def _print_log(self, expr):
        return f"torch.log({self._print(expr.args[0])})"

    def _print_sigmoid(self, expr):
        return f"torch.sigmoid({self._print(expr.args[0])})"

    def _print_Pow(self, expr):
        base, exponent = expr.args
        if exponent == sp.Rational(-1, 2):
            return f"torch.rsqrt({self._print(base)})"
        if exponent == sp.Rational(1, 2):
            return f"torch.sqrt({self._print(base)})"
        return super()._print_Pow(expr)


class _TritonElementwisePrinter(_ElementwisePrinter):
    """An elementwise function of a register tile in a Triton kernel: `tl` has no tanh, log1p or power, so
    tanh(x) is 2 sigmoid(2x) - 1 and x^n a product (x^(k/2) with rsqrt or sqrt)."""

    def __init__(self, names: dict[str, str]):
        super().__init__(names, "tl")

    def _print_tanh(self, expr):
        return f"(2 * tl.sigmoid(2 * ({self._print(expr.args[0])})) - 1)"

    def _print_sigmoid(self, expr):
        return f"tl.sigmoid({self._print(expr.args[0])})"

    def _print_erf(self, expr):
        return f"tl.erf({self._print(expr.args[0])})"

    def _print_log(self, expr):
        return f"tl.log({self._print(expr.args[0])})"

    def _print_Pow(self, expr):
        base, exponent = expr.args
        b, power = self.parenthesize(base, 100), float(exponent)  # numbers are floats by now
        if power.is_integer() and 0 < power <= 4:
            return "(" + " * ".join([b] * int(power)) + ")"
        if power.is_integer() and -4 <= power < 0:
            return "(1 / (" + " * ".join([b] * int(-power)) + "))"
        if power == -0.5:
            return f"tl.rsqrt({self._print(base)})"
        if power == 0.5:
            return f"tl.sqrt({self._print(base)})"
        if power == -1.5:
            return f"(tl.rsqrt({self._print(base)}) / {b})"
        return f"tl.exp({self._print(exponent)} * tl.log({self._print(base)}))"


@dataclass(frozen=True)
class Dialect:
    """How the lines spell the operations on a mini-batch: torch on tensors `[..., r, c]` (leading batch and
    head axes), or Triton on one sequence and head's register tiles `[r, c]` inside a kernel, whose products
    are `tl.dot` at the kernel's `DOT` precision (or another constexpr the caller names)."""

    name: str

    @property
    def triton(self) -> bool:
        return self.name == "triton"

    def mm(self, a: str, b: str, precision: str = "DOT") -> str:
        return f"tl.dot({a}, {b}, input_precision={precision})" if self.triton else f"{_grouped(a)} @ {_grouped(b)}"

    def state_mm(self, a: str, b: str, a_exact: bool) -> str:
        """A product on the way to the carried state: the kernel's `_state_dot` at its STATE_DOT precision, told
        whether the left operand is exact in the inputs' dtype (then only the right one is split)."""
        if not self.triton:
            return self.mm(a, b)
        return f"_state_dot({a}, {b}, STATE_DOT, {a_exact})"

    def t(self, a: str) -> str:
        return f"tl.trans({a})" if self.triton else f"{a}.transpose(-1, -2)"

    def row_sum(self, expr: str) -> str:
        """The sum over a row's entries, as a column."""
        return f"tl.sum({expr}, axis=1)[:, None]" if self.triton else f"{_grouped(expr)}.sum(-1, keepdim=True)"

    def column_sum(self, expr: str) -> str:
        """The sum over the rows, as a vector."""
        return f"tl.sum({expr}, axis=0)[None, :]" if self.triton else f"{_grouped(expr)}.sum(-2, keepdim=True)"

    def row_mean(self, a: str) -> str:
        return f"tl.sum({a}, axis=1)[:, None] / {a}.shape[1]" if self.triton else f"{a}.mean(-1, keepdim=True)"

    def spread(self, column: str, like: str) -> str:
        """A column's gradient of a row mean, spread over the rows' entries."""
        if self.triton:
            return f"tl.broadcast_to({column} / {like}.shape[1], {like}.shape)"
        return f"({column} / {like}.shape[-1]).expand_as({like})"

    def printer(self, names: dict[str, str]) -> _ElementwisePrinter:
        return _TritonElementwisePrinter(names) if self.triton else _ElementwisePrinter(names)


TORCH, TRITON = Dialect("torch"), Dialect("triton")


def _numbers_evaluated(expr: sp.Expr) -> sp.Expr:
    """expr with every constant subexpression (sqrt(2 / pi), ...) a float: torch functions take tensors."""
    if expr.is_number and not expr.is_Integer:
        return sp.Float(expr.evalf(17))
    if not expr.args:
        return expr
    return expr.func(*(_numbers_evaluated(a) for a in expr.args))


def print_elementwise(function: sp.Expr, argument: str) -> str:
    """torch code of function(X) at the tensor named `argument` (constants such as sqrt(2 / pi) as numbers)."""
    return _ElementwisePrinter({X.name: argument}).doprint(_numbers_evaluated(function))


def activation_lines(function: sp.Expr, argument: str, output: str) -> tuple[list[str], str, list[str], str]:
    """An activation and its derivative with their common subexpressions named once: (lines the forward
    needs, the code of function(X) that reads them, lines only the derivative needs, the code of
    function'(X)). The forward's lines come before the derivative's wherever both are printed, so a GELU's
    tanh is taken once per forward and reused by the backward, and a derivative that contains the whole
    activation reads it as `output` (SiLU's: sigmoid_x + output (1 - sigmoid_x)). Each other name is the
    function's and the argument's (`tanh_z1`), or numbered (`z1_part0`)."""
    printer = _ElementwisePrinter({X.name: argument})
    replacements, (forward, derivative) = sp.cse(
        [_numbers_evaluated(function), _numbers_evaluated(sp.diff(function, X))], symbols=sp.numbered_symbols("_part"))
    names, uses = {}, {}
    for index, (symbol, subexpression) in enumerate(replacements):
        head = type(subexpression).__name__.lower()
        names[symbol] = sp.Symbol(output if symbol == forward else f"{head}_{argument}"
                                  if isinstance(subexpression, sp.Function) else f"{argument}_part{index}")
        uses[symbol] = subexpression.free_symbols & set(names)
    if forward in names:  # the activation is itself shared: its own line prints it
        whole = dict(replacements)[forward]
        replacements = [(symbol, value) for symbol, value in replacements if symbol != forward]
        forward = whole
    in_forward = forward.free_symbols & set(names)
    for symbol, _ in reversed(replacements):  # what the forward's parts read, transitively
        if symbol in in_forward:
            in_forward |= uses[symbol]
    lines = {symbol: f"{names[symbol]} = {printer.doprint(subexpression.xreplace(names))}"
             for symbol, subexpression in replacements}
    return ([lines[s] for s, _ in replacements if s in in_forward], printer.doprint(forward.xreplace(names)),
            [lines[s] for s, _ in replacements if s not in in_forward], printer.doprint(derivative.xreplace(names)))


def forward_lines(program: Program) -> list[str]:
    """The forward as lines, one per operation."""
    lines = []
    for op in program.ops:
        a = [v.name for v in op.args]
        expression = {
            "linear": lambda: TORCH.mm(a[0], a[1]),
            "add": lambda: f"{a[0]} + {a[1]}",
            "sub": lambda: f"{a[0]} - {a[1]}",
            "mul": lambda: f"{a[0]} * {a[1]}",
            "mean": lambda: TORCH.row_mean(a[0]),
            "apply": lambda: _named_activation(op.function, a[0], op.out.name, lines),
        }[op.fn]()
        lines.append(f"{op.out.name} = {expression}")
    return lines


def _named_activation(function: sp.Expr, argument: str, output: str, lines: list[str]) -> str:
    """The code of an activation, after appending the lines of the subexpressions it shares with its derivative."""
    shared, forward, _, _ = activation_lines(function, argument, output)
    lines.extend(shared)
    return forward


def gradient_lines(program: Program, output: Value, target: Value, weight: Value | None,
                   wrt: list[Value]) -> list[str]:
    """Lines computing d_<w> for every w in `wrt`: the gradient of 1/2 sum_i weight_i ||output_i -
    target_i||^2 (weight a column: a per-row learning rate; None: 1) after the forward's lines.

    The adjoint of a value is the sum of its uses' vector-Jacobian products, taken last use first; only
    values on a path from `wrt` to the output get one."""
    needed = {v.name for v in wrt}
    for op in program.ops:  # forward order: a value is needed if it depends on a weight asked for
        if any(a.name in needed for a in op.args):
            needed.add(op.out.name)
    if output.name not in needed:
        raise ValueError(f"the output {output.name} does not depend on {[v.name for v in wrt]}")
    residual = f"{output.name} - {target.name}"
    lines = [f"d_{output.name} = {weight.name} * ({residual})" if weight is not None else f"d_{output.name} = {residual}"]
    has_adjoint = {output.name}

    def accumulate(value: Value, contribution: str) -> None:
        if value.name not in needed:
            return
        if value.name in has_adjoint:
            lines.append(f"d_{value.name} = d_{value.name} + {contribution}")
        else:
            lines.append(f"d_{value.name} = {contribution}")
            has_adjoint.add(value.name)

    for op in reversed(program.ops):
        if op.out.name not in has_adjoint:
            continue
        g, kind = f"d_{op.out.name}", op.out.kind
        if op.fn == "linear":
            x, w = op.args
            accumulate(x, TORCH.mm(g, TORCH.t(w.name)))
            accumulate(w, TORCH.mm(TORCH.t(x.name), g))
        elif op.fn in ("add", "sub"):
            a, b = op.args
            accumulate(a, _reduce(g, kind, a.kind))
            reduced = _reduce(g, kind, b.kind)
            accumulate(b, f"-{reduced}" if op.fn == "sub" else reduced)
        elif op.fn == "mul" and op.args[0] == op.args[1]:  # a square
            (a, _) = op.args
            accumulate(a, f"2 * {g} * {a.name}")
        elif op.fn == "mul":
            a, b = op.args
            accumulate(a, _reduce(f"{g} * {b.name}", kind, a.kind))
            accumulate(b, _reduce(f"{g} * {a.name}", kind, b.kind))
        elif op.fn == "mean":
            (a,) = op.args
            accumulate(a, TORCH.spread(g, a.name))
        elif op.fn == "apply":
            (a,) = op.args
            if a.name in needed:
                _, _, named, derivative = activation_lines(op.function, a.name, op.out.name)  # after the forward's
                lines.extend(named)
                accumulate(a, f"{g} * ({derivative})")
    missing = [v.name for v in wrt if v.name not in has_adjoint]
    assert not missing, f"no gradient reached {missing}"
    return lines


# The memory networks of the `mlp` regressor class, as programs over a mini-batch x [.., n, D] -> [.., n, D].

class sigmoid(sp.Function):  # noqa: N801  (printed as torch.sigmoid)
    """1 / (1 + exp(-x)) as one function: its derivative sigmoid (1 - sigmoid) stays finite where exp(-x)
    overflows (x below about -88 in float32), which the quotient rule's form of the expanded one does not."""

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0]) * (1 - sigmoid(self.args[0]))


GELU_TANH = sp.Rational(1, 2) * X * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (X + sp.Float(0.044715) * X ** 3)))
SILU = X * sigmoid(X)
ACTIVATIONS = {"gelu_tanh": GELU_TANH, "silu": SILU}


@dataclass(frozen=True)
class Layer:
    """One linear layer of a memory network: product = x weight, out = product + bias (or product)."""

    x: Value
    weight: Value
    bias: Value | None
    product: Value
    out: Value


@dataclass(frozen=True)
class MemoryNetwork:
    """g(x) of an `mlp` regressor: its program, layers, output (what the loss fits) and parameters."""

    program: Program
    x: Value
    layers: list[Layer]
    output: Value  # g(x)
    fast_weights: list[Value]  # trained at test time, in state order
    norm: list[Value]  # the layer norm's weight and bias (fixed per head), or none


def layer_suffixes(depth: int) -> list[str]:
    """The layers' names: W (and b) for one layer, W1, W2, ... for several."""
    return [""] if depth == 1 else [str(i + 1) for i in range(depth)]


def memory_network(depth: int, activation: str | None, bias: bool, layer_norm: bool,
                   eps: float = 1e-6) -> MemoryNetwork:
    """g(x) = [LN](x W [+ b]) for depth 1; for depth n, [LN](act(... act(x W1 [+ b1]) ...) Wn [+ bn])."""
    p = Program()
    x = p.input("x", ROWS)
    layers, h = [], x
    for i, suffix in enumerate(layer_suffixes(depth)):
        W = p.input(f"W{suffix}", MATRIX)
        b = p.input(f"b{suffix}", VECTOR) if bias else None
        product = p.linear(f"{h.name}W{suffix}", h, W)
        out = p.add(f"z{suffix}", product, b) if b is not None else product
        layers.append(Layer(h, W, b, product, out))
        if i + 1 < depth:
            h = p.apply(f"hidden{suffix}", ACTIVATIONS[activation], out)
    output, norm = layers[-1].out, []
    if layer_norm:
        norm = [p.input("ln_weight", VECTOR), p.input("ln_bias", VECTOR)]
        output = p.layer_norm("ln", output, *norm, eps)
    fast = [w for layer in layers for w in (layer.weight, layer.bias) if w is not None]
    return MemoryNetwork(p, x, layers, output, fast, norm)


def ttt_linear(eps: float = 1e-6) -> tuple[Program, Value, list[Value]]:
    """TTT-Linear's memory: f(x) = x + LN(x W + b); the loss compares LN(x W + b) with y - x. Returns the
    program, its output (the residual branch) and the fast weights [W, b]."""
    net = memory_network(1, None, True, True, eps)
    return net.program, net.output, net.fast_weights


def ttt_mlp(eps: float = 1e-6) -> tuple[Program, Value, list[Value]]:
    """TTT-MLP's memory: f(x) = x + LN(gelu(x W1 + b1) W2 + b2) (tanh GELU); fast weights W1, b1, W2, b2."""
    net = memory_network(2, "gelu_tanh", True, True, eps)
    return net.program, net.output, net.fast_weights


def titans_mlp() -> tuple[Program, Value, list[Value]]:
    """Titans' MLP memory: f(x) = silu(x W1) W2; fast weights W1, W2."""
    net = memory_network(2, "silu", False, False)
    return net.program, net.output, net.fast_weights


# The mini-batch dual form: the network read at every row of a mini-batch with that row's weights, which
# are the start weights moved by the rows' gradients, without forming them. A layer's weights at row i are
#     W_i = keep_i W + carry_i S_W + sum_j mix_ij x_j^T delta_j,   b_i = keep_i b + carry_i S_b + sum_j mix_ij delta_j
# (delta_j: the loss gradient at row j's layer output, x_j: its layer input, both at the start weights;
# S: the momentum at the start; keep, carry, mix: scalars from the optimiser's recurrences). So its output at
# query row i is keep_i (x_qi W) + carry_i (x_qi S_W) + sum_j mix_ij (x_qi . x_j) delta_j (+ the bias's terms).

def query_lines(net: MemoryNetwork, keep: bool, momentum: bool) -> list[str]:
    """Lines of the network at the query rows `x_q` with per-row weights (names: <value>_q). The key
    side's values and their adjoints d_<layer product> must be computed; `mix` [.., n, n], and with `keep`
    a column `keep`, with `momentum` a column `carry` and the momenta S_<weight>."""
    layer_of = {layer.product.name: layer for layer in net.layers}
    bias_of = {layer.out.name: layer for layer in net.layers if layer.bias is not None}
    fixed = {v.name for v in net.program.inputs if v is not net.x}
    q = lambda v: v.name if v.name in fixed else f"{v.name}_q"  # noqa: E731

    def start_term(weight: str, product) -> str:
        """product(weight) at the start weights, scaled by keep, plus product(momentum) scaled by carry."""
        term = f"keep * {_grouped(product(weight))}" if keep else product(weight)
        return term + (f" + carry * {_grouped(product('S_' + weight))}" if momentum else "")

    lines = []
    for op in net.program.ops:
        name = op.out.name
        if name in layer_of:
            layer = layer_of[name]
            x_q = q(layer.x)
            mixed = TORCH.mm(f"mix * {_grouped(TORCH.mm(x_q, TORCH.t(layer.x.name)))}", f"d_{name}")
            lines.append(f"{name}_q = {start_term(layer.weight.name, lambda w: TORCH.mm(x_q, w))} + {mixed}")
        elif name in bias_of:
            layer = bias_of[name]
            lines.append(f"{name}_q = {layer.product.name}_q + {start_term(layer.bias.name, lambda b: b)} + "
                         f"{TORCH.mm('mix', f'd_{layer.product.name}')}")
        else:
            renamed = Program(ops=[Op(Value(q(op.out), op.out.kind), op.fn, tuple(Value(q(a), a.kind) for a in op.args),
                                      op.function)])
            lines += forward_lines(renamed)
    return lines


def state_update_lines(net: MemoryNetwork, keep: bool, momentum: bool) -> list[str]:
    """Lines moving every fast weight (and momentum) to the mini-batch's end: `mix_end` [.., n, 1] is
    the last row of mix as a column; `keep_end`, `carry_end` [.., 1, 1]; with momentum, the momenta's own
    coefficients `decay_end` [.., 1, 1] and `push_end` [.., n, 1] (each row's gradient in the end momentum)."""
    lines = []
    for layer in net.layers:
        delta = f"d_{layer.product.name}"
        increments = ((layer.weight.name, lambda c: TORCH.mm(TORCH.t(layer.x.name), f"{c} * {delta}")),
                      (layer.bias.name if layer.bias else None, lambda c: TORCH.column_sum(f"{c} * {delta}")))
        for weight, increment in increments:
            if weight is None:
                continue
            start = f"keep_end * {weight}" if keep else weight
            start += f" + carry_end * S_{weight}" if momentum else ""
            lines.append(f"{weight} = {start} + {increment('mix_end')}")
            if momentum:  # after the weight, which reads the momentum of the mini-batch start
                lines.append(f"S_{weight} = decay_end * S_{weight} + {increment('push_end')}")
    return lines
