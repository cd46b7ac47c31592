"""One mini-batch of a nonlinear memory's dual form as a program of tile operations, and its reverse mode:
the lines a backward pass runs per mini-batch.

`derive.online` prints the dual form's forward (chunk.py, online_triton.py). Training needs its
vector-Jacobian product: given the adjoints of a mini-batch's outputs and of its end state, the adjoints of
its inputs (key, value and query rows, the start state, the layer norm's parameters and the optimiser's
coefficients). Here the whole mini-batch, the loss gradients inside it included, is one straight line of
operations on 2-D tiles, so reverse mode applies to it as to any program: the forward's own gradient lines
are differentiated again (an activation's second derivative comes from SymPy).

A tile's shape names its axes: "n" (the mini-batch's rows), a width ("K", "V", "HIDDEN") or "1" (a
column, a vector or a scalar); products follow the shapes, sums reduce the axes a value was broadcast along.
The same operations print as torch on `[..., r, c]` tensors or as Triton on register tiles (`online.Dialect`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from . import online
from .online import X, Dialect

ONE = "1"
REDUCTIONS = frozenset({"row_sum", "column_sum", "row_mean"})


@dataclass(frozen=True)
class Tile:
    name: str
    shape: tuple[str, str]


@dataclass(frozen=True)
class TileOp:
    out: Tile
    fn: str  # matmul, add, sub, mul, neg, scale, shift, row_sum, column_sum, row_mean, spread, apply, zeros
    args: tuple[Tile, ...]
    transpose: tuple[bool, bool] = (False, False)  # matmul: which operand enters transposed
    function: sp.Expr | None = None  # apply: an elementary function of online.X (tanh, sigmoid, rsqrt, ...)
    constant: float | None = None  # scale: the factor; shift: the number added


def _broadcast(a: tuple[str, str], b: tuple[str, str]) -> tuple[str, str]:
    shape = tuple(x if y == ONE else y for x, y in zip(a, b))
    assert all(x in (ONE, y) for x, y in zip(a, shape)) and all(y in (ONE, z) for y, z in zip(b, shape)), (a, b)
    return shape


@dataclass
class TileProgram:
    inputs: list[Tile] = field(default_factory=list)
    ops: list[TileOp] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    computed: dict[tuple, Tile] = field(default_factory=dict)  # an operation and its arguments -> its tile
    defined_by: dict[str, TileOp] = field(default_factory=dict)  # a computed tile's name -> its operation
    depths: dict[str, int] = field(default_factory=dict)  # a tile's name -> reductions one after another to it

    def input(self, name: str, shape: tuple[str, str]) -> Tile:
        tile = Tile(name, shape)
        self.inputs.append(tile)
        self.names.add(name)
        return tile

    def fresh(self, name: str) -> str:
        """name, or name with a number where it is taken."""
        candidate, i = name, 1
        while candidate in self.names:
            candidate, i = f"{name}_{i}", i + 1
        self.names.add(candidate)
        return candidate

    def op(self, name: str, fn: str, args: tuple[Tile, ...], shape: tuple[str, str], **options) -> Tile:
        """The tile of fn(args): the one already computed where the same operation ran before (each common
        subexpression once, in the forward and in its reverse mode), else a new one named after name."""
        key = (fn, args, shape, tuple(sorted(options.items(), key=lambda item: item[0])))
        if key in self.computed:
            return self.computed[key]
        out = Tile(self.fresh(name), shape)
        op = TileOp(out, fn, args, **options)
        self.ops.append(op)
        self.computed[key] = out
        self.defined_by[out.name] = op
        self.depths[out.name] = 0 if fn == "zeros" else max((self.depth(a) for a in args), default=0) + (
            fn in REDUCTIONS)
        return out

    def prune(self, kept: set[str]) -> None:
        """Drop the operations nothing named in kept reads, directly or through others (a sum shallow_row_sum
        wrote another way), and forget their tiles."""
        self.ops = needed(self.ops, [], kept)
        live = {op.out.name for op in self.ops} | {t.name for t in self.inputs}
        self.computed = {key: tile for key, tile in self.computed.items() if tile.name in live}
        self.defined_by = {name: op for name, op in self.defined_by.items() if name in live}

    def depth(self, tile: Tile) -> int:
        """How many reductions (row or column sums and means) run one after another to compute tile: each
        waits for every thread of a row or column, so they set a mini-batch's latency more than its size."""
        return self.depths.get(tile.name, 0)

    # --- operations --------------------------------------------------------------------------------
    def matmul(self, name: str, a: Tile, b: Tile, ta: bool = False, tb: bool = False) -> Tile:
        rows, inner = a.shape[::-1] if ta else a.shape
        inner_b, cols = b.shape[::-1] if tb else b.shape
        assert inner == inner_b, (a, b, ta, tb)
        return self.op(name, "matmul", (a, b), (rows, cols), transpose=(ta, tb))

    # Zeros fold away: a row sum of rows centred on their mean is zero in exact arithmetic (a layer norm's
    # gradient has one: the variance's slope in the mean), and so are the terms it scales; left in, they cost
    # a reduction on the mini-batch's path and add only rounding.
    def add(self, name: str, a: Tile, b: Tile) -> Tile:
        shape = _broadcast(a.shape, b.shape)
        if self.is_zero(b) and a.shape == shape:
            return a
        if self.is_zero(a) and b.shape == shape:
            return b
        return self.op(name, "add", (a, b), shape)

    def sub(self, name: str, a: Tile, b: Tile) -> Tile:
        shape = _broadcast(a.shape, b.shape)
        if self.is_zero(b) and a.shape == shape:
            return a
        if self.is_zero(a) and b.shape == shape:
            return self.neg(name, b)
        return self.op(name, "sub", (a, b), shape)

    def mul(self, name: str, a: Tile, b: Tile) -> Tile:
        shape = _broadcast(a.shape, b.shape)
        zero = next((t for t in (a, b) if self.is_zero(t) and t.shape == shape), None)
        if zero is None and (self.is_zero(a) or self.is_zero(b)):  # zeros of the other's shape
            zero = next((self.zeros(t) for t in (a, b) if t.shape == shape), None)
        return zero if zero is not None else self.op(name, "mul", (a, b), shape)

    def neg(self, name: str, a: Tile) -> Tile:
        return a if self.is_zero(a) else self.op(name, "neg", (a,), a.shape)

    def zeros(self, like: Tile) -> Tile:
        """Zeros of like's shape (it only gives the printed line a shape)."""
        return self.op(f"zeros_{like.name}", "zeros", (like,), like.shape)

    def is_zero(self, a: Tile) -> bool:
        return getattr(self.defined_by.get(a.name), "fn", None) == "zeros"

    def _row_mean_column(self, a: Tile) -> Tile | None:
        """The column m where a is its own rows centred on their mean (a - m, m - a with m = row_mean(rows)),
        else None: a's row sums are then zero."""
        op = self.defined_by.get(a.name)
        if op is None or op.fn != "sub":
            return None
        for rows, column in (op.args, op.args[::-1]):
            mean = self.defined_by.get(column.name)
            if mean is not None and mean.fn == "row_mean" and mean.args[0] == rows:
                return column
        return None

    def row_sum(self, name: str, a: Tile) -> Tile:
        column = self._row_mean_column(a)
        if column is not None:
            return self.zeros(column)
        return self.op(name, "row_sum", (a,), (a.shape[0], ONE))

    def column_sum(self, name: str, a: Tile) -> Tile:
        return self.op(name, "column_sum", (a,), (ONE, a.shape[1]))

    def row_mean(self, name: str, a: Tile) -> Tile:
        column = self._row_mean_column(a)
        if column is not None:
            return self.zeros(column)
        return self.op(name, "row_mean", (a,), (a.shape[0], ONE))

    def scale(self, name: str, a: Tile, factor: float) -> Tile:
        return a if self.is_zero(a) else self.op(name, "scale", (a,), a.shape, constant=factor)

    def shift(self, name: str, a: Tile, offset: float) -> Tile:
        return self.op(name, "shift", (a,), a.shape, constant=offset)

    def spread(self, name: str, column: Tile, like: Tile) -> Tile:
        """column / (like's width), at every entry of like's rows: a row mean's adjoint."""
        return self.zeros(like) if self.is_zero(column) else self.op(name, "spread", (column, like), like.shape)

    def apply(self, name: str, function: sp.Expr, a: Tile) -> Tile:
        """function(a) entrywise, written as primitives (sums, products, numbers) around elementary functions
        of one argument, so that reverse mode reuses their values (tanh' = 1 - tanh^2 from tanh's tile)."""
        return self._expression(name, online._numbers_evaluated(function), a, {})

    def _expression(self, name: str, expr: sp.Expr, a: Tile, done: dict) -> Tile:
        if expr in done:
            return done[expr]
        if expr == X:
            return a
        part = f"{a.name}_part"  # an intermediate of the expression (numbered by `fresh`)
        number, rest = expr.as_coeff_Mul() if expr.is_Mul else expr.as_coeff_Add() if expr.is_Add else (None, expr)
        if expr.is_Mul and number != 1:
            result = self.scale(name, self._expression(part, rest, a, done), float(number))
        elif expr.is_Add and number != 0:
            result = self.shift(name, self._expression(part, rest, a, done), float(number))
        elif expr.is_Add or expr.is_Mul:
            combine = self.add if expr.is_Add else self.mul
            terms = [self._expression(part, term, a, done) for term in expr.args]
            result = terms[0]
            for term in terms[1:]:
                result = combine(name, result, term)
        elif expr.is_Pow and expr.exp.is_Integer and 1 < expr.exp <= 4:
            base = self._expression(part, expr.base, a, done)
            result = base
            for _ in range(int(expr.exp) - 1):
                result = self.mul(f"{base.name}_power", result, base)
        elif len(expr.args) == 1 or expr.is_Pow:  # an elementary function of one expression
            inner = expr.args[0] if not expr.is_Pow else expr.base
            argument = self._expression(part, inner, a, done)
            function = expr.func(X) if not expr.is_Pow else X ** expr.exp
            label = "power" if expr.is_Pow else type(expr).__name__.lower()
            result = self.op(f"{label}_{a.name}" if name.startswith(a.name + "_part") else name, "apply",
                             (argument,), argument.shape, function=function)
        else:
            raise NotImplementedError(f"no tile form for {expr}")
        done[expr] = result
        return result

    def _slope(self, op: TileOp) -> Tile:
        """The derivative of an elementary function at op's argument, from its value where that is cheaper."""
        y, name = op.out, f"{op.out.name}_slope"
        if op.function.func == sp.tanh:  # 1 - tanh^2
            return self.shift(name, self.scale(name, self.mul(name, y, y), -1.0), 1.0)
        if op.function.func == online.sigmoid:  # sigmoid (1 - sigmoid)
            return self.mul(name, y, self.shift(name, self.scale(name, y, -1.0), 1.0))
        if op.function.is_Pow and float(op.function.exp) == -0.5:  # -x^(-3/2) / 2 = -y^3 / 2
            return self.scale(name, self.mul(name, y, self.mul(name, y, y)), -0.5)
        if op.function.func == sp.exp:
            return y
        derivative = sp.diff(op.function, X)
        return self.op(name, "apply", op.args, y.shape, function=derivative)

    def reduce_to(self, name: str, g: Tile, shape: tuple[str, str]) -> Tile:
        """g summed over the axes along which a value of `shape` was broadcast to g's."""
        if shape[0] == ONE and g.shape[0] != ONE:
            g = self.column_sum(name, g)
        if shape[1] == ONE and g.shape[1] != ONE:
            g = self.shallow_row_sum(name, g)
        return g

    def shallow_row_sum(self, name: str, g: Tile) -> Tile:
        """row_sum(g), distributed over g's sums, negations, scalings and factors constant along a row wherever
        that puts fewer reductions one after another: a layer norm's gradient sums the residual's rows while it
        sums them times the normalised rows, rather than after (sum(a c) = c sum(a) for a column c; the sum of
        a row mean spread over a row is the mean's column)."""
        if self._row_sum_depth(g) >= self.depth(g) + 1:
            return self.row_sum(name, g)
        op = self.defined_by[g.name]
        if op.fn in ("add", "sub"):
            return getattr(self, op.fn)(name, *(self.shallow_row_sum(name, a) for a in op.args))
        if op.fn == "neg":
            return self.neg(name, self.shallow_row_sum(name, op.args[0]))
        if op.fn == "scale":
            return self.scale(name, self.shallow_row_sum(name, op.args[0]), op.constant)
        if op.fn == "spread":
            return op.args[0]
        row, factor = self._row_factor(op)  # mul
        if factor.shape[1] == ONE:
            return self.mul(name, self.shallow_row_sum(name, row), factor)
        return self.mul(name, self.row_mean(name, row), self.defined_by[factor.name].args[0])  # factor: a spread

    def _row_sum_depth(self, g: Tile) -> int:
        """The fewest reductions one after another to row_sum(g) as shallow_row_sum may write it."""
        plain = self.depth(g) + 1
        op = self.defined_by.get(g.name)
        if op is None:
            return plain
        if op.fn in ("add", "sub") and all(a.shape[1] == g.shape[1] for a in op.args):
            return min(plain, max(self._row_sum_depth(a) for a in op.args))
        if op.fn in ("neg", "scale"):
            return min(plain, self._row_sum_depth(op.args[0]))
        if op.fn == "spread":
            return min(plain, self.depth(op.args[0]))
        if op.fn == "mul" and self._row_factor(op) is not None:
            row, factor = self._row_factor(op)
            if factor.shape[1] == ONE:
                return min(plain, max(self._row_sum_depth(row), self.depth(factor)))
            column = self.defined_by[factor.name].args[0]
            return min(plain, max(self.depth(row) + 1, self.depth(column)))
        return plain

    def _row_factor(self, op: TileOp) -> tuple[Tile, Tile] | None:
        """A product's (full-width operand, operand constant along each row: a column, or a spread column),
        or None."""
        for row, factor in (op.args, op.args[::-1]):
            constant = factor.shape[1] == ONE or getattr(self.defined_by.get(factor.name), "fn", None) == "spread"
            if constant and row.shape[1] != ONE:
                return row, factor
        return None

    # --- reverse mode ------------------------------------------------------------------------------
    def adjoints(self, seeds: dict[str, Tile], wrt: list[Tile], prefix: str = "d_",
                 forward: list[TileOp] | None = None) -> dict[str, Tile]:
        """Append the ops of every adjoint asked for: seeds maps a value's name to its adjoint; the result
        maps each of `wrt`'s names to its adjoint (absent where no seed depends on it). The adjoint of a value
        is the sum of its uses' vector-Jacobian products, taken last use first. forward: the operations
        differentiated (all so far where None)."""
        forward = list(self.ops) if forward is None else forward
        wanted = {t.name for t in wrt}
        for op in forward:  # forward order: a value matters if it depends on one asked for
            if any(a.name in wanted for a in op.args):
                wanted.add(op.out.name)
        adjoint = dict(seeds)

        def accumulate(value: Tile, contribution: Tile) -> None:
            if value.name not in wanted:
                return
            contribution = self.reduce_to(f"{prefix}{value.name}", contribution, value.shape)
            if value.name in adjoint:
                adjoint[value.name] = self.add(f"{prefix}{value.name}", adjoint[value.name], contribution)
            else:
                adjoint[value.name] = contribution

        for op in reversed(forward):
            g = adjoint.get(op.out.name)
            if g is None:
                continue
            name = lambda a: f"{prefix}{a.name}"  # noqa: E731
            if op.fn == "matmul":
                (a, b), (ta, tb) = op.args, op.transpose
                if a.name in wanted:
                    accumulate(a, self.matmul(name(a), b, g, ta=tb, tb=True) if ta else
                               self.matmul(name(a), g, b, tb=not tb))
                if b.name in wanted:
                    accumulate(b, self.matmul(name(b), g, a, ta=True, tb=ta) if tb else
                               self.matmul(name(b), a, g, ta=not ta))
            elif op.fn in ("add", "sub"):
                a, b = op.args
                accumulate(a, g)
                if b.name in wanted:
                    accumulate(b, self.neg(name(b), g) if op.fn == "sub" else g)
            elif op.fn == "neg":
                accumulate(op.args[0], self.neg(name(op.args[0]), g))
            elif op.fn == "scale":
                accumulate(op.args[0], self.scale(name(op.args[0]), g, op.constant))
            elif op.fn == "shift":
                accumulate(op.args[0], g)
            elif op.fn == "mul":
                a, b = op.args
                if a.name in wanted:
                    accumulate(a, self.mul(name(a), g, b))
                if b.name in wanted:
                    accumulate(b, self.mul(name(b), g, a))
            elif op.fn == "row_sum":
                (a,) = op.args
                accumulate(a, self.mul(name(a), g, self._ones_like(a)))
            elif op.fn == "column_sum":
                (a,) = op.args
                accumulate(a, self.mul(name(a), g, self._ones_like(a)))
            elif op.fn == "row_mean":
                (a,) = op.args
                accumulate(a, self.spread(name(a), g, a))
            elif op.fn == "spread":  # column / width at every entry: the column's adjoint is the row mean
                column, like = op.args
                accumulate(column, self.row_mean(name(column), g))
            elif op.fn == "apply":
                (a,) = op.args
                if a.name in wanted:
                    accumulate(a, self.mul(name(a), g, self._slope(op)))
            elif op.fn == "zeros":  # a constant: nothing flows back to the tile that gave its shape
                pass
            else:
                raise AssertionError(op.fn)
        return {t.name: adjoint[t.name] for t in wrt if t.name in adjoint}

    def _ones_like(self, a: Tile) -> Tile:
        """A tile of ones of a's shape (a column or vector's adjoint spread over the rows it summed)."""
        return self.op(f"ones_{a.name}", "apply", (a,), a.shape, function=sp.Integer(1))


# --- printing ------------------------------------------------------------------------------------------

def print_ops(ops: list[TileOp], dialect: Dialect, state_path: frozenset[str] = frozenset(),
              exact_left: frozenset[str] = frozenset()) -> list[str]:
    """One line per operation; the products that make a value in state_path (see lower_online._kernel) at the
    kernel's STATE_DOT precision (through its `_state_dot`, told whether the product is in `exact_left`: its
    left operand exact in the inputs' dtype), the others at its DOT."""
    lines = []
    for op in ops:
        a = [t.name for t in op.args]
        if op.fn == "matmul":
            (ta, tb) = op.transpose
            left, right = (dialect.t(a[0]) if ta else a[0]), (dialect.t(a[1]) if tb else a[1])
            if op.out.name in state_path:
                code = dialect.state_mm(left, right, op.out.name in exact_left)
            else:
                code = dialect.mm(left, right)
        elif op.fn in ("add", "sub", "mul"):
            code = f"{a[0]} {dict(add='+', sub='-', mul='*')[op.fn]} {a[1]}"
        elif op.fn == "neg":
            code = f"-{a[0]}"
        elif op.fn == "scale":
            code = f"{op.constant!r} * {a[0]}"
        elif op.fn == "shift":
            code = f"{a[0]} + {op.constant!r}" if op.constant >= 0 else f"{a[0]} - {-op.constant!r}"
        elif op.fn == "row_sum":
            code = dialect.row_sum(a[0])
        elif op.fn == "column_sum":
            code = dialect.column_sum(a[0])
        elif op.fn == "row_mean":
            code = dialect.row_mean(a[0])
        elif op.fn == "spread":
            code = dialect.spread(a[0], a[1])
        elif op.fn == "zeros":
            code = f"tl.zeros_like({a[0]})" if dialect.triton else f"torch.zeros_like({a[0]})"
        elif op.fn == "apply":
            if op.function.free_symbols == set():  # a constant at every entry
                value = float(op.function)
                code = (f"tl.full({a[0]}.shape, {value!r}, tl.float32)" if dialect.triton
                        else f"torch.full_like({a[0]}, {value!r})")
            else:
                code = dialect.printer({X.name: a[0]}).doprint(online._numbers_evaluated(op.function))
        else:
            raise AssertionError(op.fn)
        lines.append(f"{op.out.name} = {code}")
    return lines


# --- one mini-batch of the dual form ----------------------------------------------------------------------

@dataclass
class MiniBatch:
    """A mini-batch's dual form as a TileProgram: its inputs by role, its output rows and end state."""

    program: TileProgram
    rows: dict[str, Tile]  # x (key rows), v (value rows), x_q (scaled query rows)
    state: list[Tile]  # the start weights, then their momenta: the live state
    fixed: list[Tile]  # the layer norm's weight and bias
    coefficients: list[Tile]  # the optimiser's: mix, keep, carry, mix_end, keep_end, carry_end, decay_end, push_end
    out: Tile
    end_state: list[Tile]  # the live state at the mini-batch's end, in `state`'s order
    deltas: list[Tile]  # the loss gradient at each layer's product, key rows


def minibatch(net: online.MemoryNetwork, keep: bool, momentum: bool, residual: bool, readout: str,
              reserved: frozenset[str] = frozenset()) -> MiniBatch:
    """The dual form of chunk.py for one mini-batch: the key rows' forward and loss gradients at the start
    weights, the query rows read with each row's weights, the read-out, the weights at the end. No
    intermediate takes a name in `reserved` (the names of the code around the printed lines)."""
    p = TileProgram(names=set(reserved))
    depth = len(net.layers)
    value = "K" if residual else "V"  # a residual memory fits v - k: V = K
    x, v, x_q = p.input("x", ("n", "K")), p.input("v", ("n", value)), p.input("x_q", ("n", "K"))
    shapes = {}
    for i, layer in enumerate(net.layers):
        rows, cols = ("K" if i == 0 else "HIDDEN"), (value if i == depth - 1 else "HIDDEN")
        shapes[layer.weight.name] = (rows, cols)
        if layer.bias is not None:
            shapes[layer.bias.name] = (ONE, cols)
    state = [p.input(w.name, shapes[w.name]) for w in net.fast_weights]
    if momentum:
        state += [p.input(f"S_{w.name}", shapes[w.name]) for w in net.fast_weights]
    tiles = {t.name: t for t in state}
    fixed = [p.input(n.name, (ONE, value)) for n in net.norm]
    tiles.update({t.name: t for t in fixed})
    coefficient_shapes = {"mix": ("n", "n"), "keep": ("n", ONE), "carry": ("n", ONE), "mix_end": ("n", ONE),
                          "keep_end": (ONE, ONE), "carry_end": (ONE, ONE), "decay_end": (ONE, ONE),
                          "push_end": ("n", ONE)}
    used = ["mix", "mix_end"] + (["keep", "keep_end"] if keep else []) + (
        ["carry", "carry_end", "decay_end", "push_end"] if momentum else [])
    coefficients = [p.input(name, coefficient_shapes[name]) for name in used]
    c = {t.name: t for t in coefficients}

    def translate(op: online.Op, names: dict[str, Tile], suffix: str) -> Tile:
        args = [names[a.name] for a in op.args]
        name = op.out.name + suffix
        if op.fn == "linear":
            return p.matmul(name, *args)
        if op.fn == "mean":
            return p.row_mean(name, *args)
        if op.fn == "apply":
            return p.apply(name, op.function, *args)
        return getattr(p, op.fn)(name, *args)

    # The key rows at the start weights, and the loss gradient at every layer's product.
    key = {"x": x, **tiles}
    for op in net.program.ops:
        key[op.out.name] = translate(op, key, "")
    target = p.sub("target", v, x) if residual else v
    residual_rows = p.sub(f"r_{net.output.name}", key[net.output.name], target)
    products = [key[layer.product.name] for layer in net.layers]
    found = p.adjoints({net.output.name: residual_rows}, products)
    deltas = [found[t.name] for t in products]

    # The query rows: a layer's product at row i is keep_i (x_qi W) [+ carry_i (x_qi S)] + sum_j mix_ij (x_qi . x_j) delta_j.
    query = {"x": x_q, **tiles}
    layer_of = {layer.product.name: i for i, layer in enumerate(net.layers)}
    bias_of = {layer.out.name: i for i, layer in enumerate(net.layers) if layer.bias is not None}

    def start_term(name: str, weight: Tile, read) -> Tile:
        term = read(weight)
        if keep:
            term = p.mul(f"{name}_kept", c["keep"], term)
        if momentum:
            term = p.add(f"{name}_start", term, p.mul(f"{name}_carried", c["carry"], read(tiles[f"S_{weight.name}"])))
        return term

    for op in net.program.ops:
        name = f"{op.out.name}_q"
        if op.out.name in layer_of:
            i = layer_of[op.out.name]
            layer, rows = net.layers[i], query[net.layers[i].x.name]
            start = start_term(name, tiles[layer.weight.name], lambda w, rows=rows: p.matmul(f"{name}_read", rows, w))
            scores = p.mul(f"{name}_mixed", c["mix"], p.matmul(f"{name}_scores", rows, key[layer.x.name], tb=True))
            query[op.out.name] = p.add(name, start, p.matmul(f"{name}_moved", scores, deltas[i]))
        elif op.out.name in bias_of:
            i = bias_of[op.out.name]
            layer = net.layers[i]
            bias = p.add(f"{name}_biased", query[layer.product.name], start_term(name, tiles[layer.bias.name], lambda b: b))
            query[op.out.name] = p.add(name, bias, p.matmul(f"{name}_moved", c["mix"], deltas[i]))
        else:
            query[op.out.name] = translate(op, query, "_q")
    g_q = query[net.output.name]
    if readout == "pre_norm":
        out = p.add("out", query[net.layers[-1].out.name], g_q)
    elif residual:
        out = p.add("out", x_q, g_q)
    else:
        out = g_q

    # The live state at the mini-batch's end.
    ends = {}
    for i, layer in enumerate(net.layers):
        rows = key[layer.x.name]
        for weight in (layer.weight, layer.bias):
            if weight is None:
                continue
            start = tiles[weight.name]
            if keep:
                start = p.mul(f"{weight.name}_kept", c["keep_end"], start)
            if momentum:
                start = p.add(f"{weight.name}_held", start, p.mul(f"{weight.name}_carried", c["carry_end"],
                                                                    tiles[f"S_{weight.name}"]))

            def increment(coefficient: str, weight=weight, rows=rows, i=i) -> Tile:
                scaled = p.mul(f"{coefficient}_{deltas[i].name}", c[coefficient], deltas[i])
                if weight is layer.weight:
                    return p.matmul(f"{weight.name}_{coefficient}_step", rows, scaled, ta=True)
                return p.column_sum(f"{weight.name}_{coefficient}_step", scaled)
            ends[weight.name] = p.add(f"{weight.name}_end", start, increment("mix_end"))
            if momentum:
                held = p.mul(f"S_{weight.name}_decayed", c["decay_end"], tiles[f"S_{weight.name}"])
                ends[f"S_{weight.name}"] = p.add(f"S_{weight.name}_end", held, increment("push_end"))
    end_state = [ends[t.name] for t in state]
    p.prune({out.name, *(t.name for t in end_state), *(t.name for t in deltas)})
    return MiniBatch(p, {"x": x, "v": v, "x_q": x_q}, state, fixed, coefficients, out, end_state, deltas)


@dataclass
class ReverseMode:
    """A mini-batch's reverse mode in two shares, the output rows' (from d_out) and the end state's (from
    d_<part>_end): an input's adjoint is the sum of its two shares. Each share's operations read only the
    forward's tiles and its own seeds, so one kernel can run the first for every mini-batch at once while
    another walks the mini-batches in reverse with the second alone (the only share that carries an adjoint
    from one mini-batch to the one before)."""

    d_out: Tile
    d_ends: list[Tile]  # in the live state's order
    read_out: dict[str, Tile]  # each input's share from d_out, by name (absent: none)
    walk: dict[str, Tile]  # each input's share from d_ends
    read_out_ops: list[TileOp]
    walk_ops: list[TileOp]


def needed(forward: list[TileOp], users: list[TileOp], wanted: set[str] | None = None) -> list[TileOp]:
    """The operations of forward that users read (or that make a value named in wanted), directly or through
    others, in forward's order (a kernel that runs only users prints only these)."""
    wanted = {a.name for op in users for a in op.args} | (wanted or set())
    kept = []
    for op in reversed(forward):
        if op.out.name in wanted:
            kept.append(op)
            wanted.update(a.name for a in op.args)
    return kept[::-1]


def stored_replay(forward: list[TileOp], users: list[TileOp]) -> tuple[list[Tile], list[TileOp]]:
    """What a kernel that runs `users` needs of `forward` when another kernel ran all of forward and stored
    its products and reductions for it: those tiles (to load, in forward's order) and the operations left to
    recompute, all element-wise. A walk over mini-batches then waits on no product or reduction of its replay."""
    replay = needed(forward, users)
    heavy = {op.out.name for op in replay if op.fn == "matmul" or op.fn in REDUCTIONS}
    rest = needed([op for op in replay if op.out.name not in heavy], users)
    read = {a.name for op in rest + users for a in op.args}
    return [op.out for op in replay if op.out.name in heavy and op.out.name in read], rest


def backward(batch: MiniBatch) -> ReverseMode:
    """Append the mini-batch's reverse mode, as two independent shares (`ReverseMode`); the adjoints are of
    every input: rows, state, layer norm and coefficients."""
    p = batch.program
    d_out = p.input("d_out", batch.out.shape)
    d_ends = [p.input(f"d_{t.name}_end", t.shape) for t in batch.state]
    wrt = [*batch.rows.values(), *batch.state, *batch.fixed, *batch.coefficients]
    forward, forward_computed = list(p.ops), dict(p.computed)

    def share(seeds: dict[str, Tile], prefix: str) -> tuple[dict[str, Tile], list[TileOp]]:
        p.computed = dict(forward_computed)  # no tile of the other share is reused: each runs alone
        first = len(p.ops)
        adjoints = p.adjoints(seeds, wrt, prefix=prefix, forward=forward)
        return adjoints, needed(p.ops[first:], [], {t.name for t in adjoints.values()})

    read_out, read_out_ops = share({batch.out.name: d_out}, "r_")
    walk, walk_ops = share({end.name: d for end, d in zip(batch.end_state, d_ends)}, "b_")
    return ReverseMode(d_out, d_ends, read_out, walk, read_out_ops, walk_ops)
