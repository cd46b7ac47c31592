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


@dataclass(frozen=True)
class Tile:
    name: str
    shape: tuple[str, str]


@dataclass(frozen=True)
class TileOp:
    out: Tile
    fn: str  # matmul, add, sub, mul, neg, row_sum, column_sum, row_mean, spread, apply
    args: tuple[Tile, ...]
    transpose: tuple[bool, bool] = (False, False)  # matmul: which operand enters transposed
    function: sp.Expr | None = None  # apply: an expression of online.X


def _broadcast(a: tuple[str, str], b: tuple[str, str]) -> tuple[str, str]:
    shape = tuple(x if y == ONE else y for x, y in zip(a, b))
    assert all(x in (ONE, y) for x, y in zip(a, shape)) and all(y in (ONE, z) for y, z in zip(b, shape)), (a, b)
    return shape


@dataclass
class TileProgram:
    inputs: list[Tile] = field(default_factory=list)
    ops: list[TileOp] = field(default_factory=list)
    names: set[str] = field(default_factory=set)

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
        out = Tile(self.fresh(name), shape)
        self.ops.append(TileOp(out, fn, args, **options))
        return out

    # --- operations --------------------------------------------------------------------------------
    def matmul(self, name: str, a: Tile, b: Tile, ta: bool = False, tb: bool = False) -> Tile:
        rows, inner = a.shape[::-1] if ta else a.shape
        inner_b, cols = b.shape[::-1] if tb else b.shape
        assert inner == inner_b, (a, b, ta, tb)
        return self.op(name, "matmul", (a, b), (rows, cols), transpose=(ta, tb))

    def add(self, name: str, a: Tile, b: Tile) -> Tile:
        return self.op(name, "add", (a, b), _broadcast(a.shape, b.shape))

    def sub(self, name: str, a: Tile, b: Tile) -> Tile:
        return self.op(name, "sub", (a, b), _broadcast(a.shape, b.shape))

    def mul(self, name: str, a: Tile, b: Tile) -> Tile:
        return self.op(name, "mul", (a, b), _broadcast(a.shape, b.shape))

    def neg(self, name: str, a: Tile) -> Tile:
        return self.op(name, "neg", (a,), a.shape)

    def row_sum(self, name: str, a: Tile) -> Tile:
        return self.op(name, "row_sum", (a,), (a.shape[0], ONE))

    def column_sum(self, name: str, a: Tile) -> Tile:
        return self.op(name, "column_sum", (a,), (ONE, a.shape[1]))

    def row_mean(self, name: str, a: Tile) -> Tile:
        return self.op(name, "row_mean", (a,), (a.shape[0], ONE))

    def spread(self, name: str, column: Tile, like: Tile) -> Tile:
        """column / (like's width), at every entry of like's rows: a row mean's adjoint."""
        return self.op(name, "spread", (column, like), like.shape)

    def apply(self, name: str, function: sp.Expr, a: Tile) -> Tile:
        return self.op(name, "apply", (a,), a.shape, function=function)

    def reduce_to(self, name: str, g: Tile, shape: tuple[str, str]) -> Tile:
        """g summed over the axes along which a value of `shape` was broadcast to g's."""
        if shape[0] == ONE and g.shape[0] != ONE:
            g = self.column_sum(name, g)
        if shape[1] == ONE and g.shape[1] != ONE:
            g = self.row_sum(name, g)
        return g

    # --- reverse mode ------------------------------------------------------------------------------
    def adjoints(self, seeds: dict[str, Tile], wrt: list[Tile], prefix: str = "d_") -> dict[str, Tile]:
        """Append the ops of every adjoint asked for: seeds maps a value's name to its adjoint; the result
        maps each of `wrt`'s names to its adjoint (absent where no seed depends on it). The adjoint of a value
        is the sum of its uses' vector-Jacobian products, taken last use first."""
        forward = list(self.ops)
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
                    slope = self.apply(f"{op.out.name}_slope", sp.diff(op.function, X), a)
                    accumulate(a, self.mul(name(a), g, slope))
            else:
                raise AssertionError(op.fn)
        return {t.name: adjoint[t.name] for t in wrt if t.name in adjoint}

    def _ones_like(self, a: Tile) -> Tile:
        """A tile of ones of a's shape (a column or vector's adjoint spread over the rows it summed)."""
        return self.apply(f"ones_{a.name}", sp.Integer(1) + 0 * X, a)


# --- printing ------------------------------------------------------------------------------------------

def print_ops(ops: list[TileOp], dialect: Dialect) -> list[str]:
    """One line per operation."""
    lines = []
    for op in ops:
        a = [t.name for t in op.args]
        if op.fn == "matmul":
            (ta, tb) = op.transpose
            code = dialect.mm(dialect.t(a[0]) if ta else a[0], dialect.t(a[1]) if tb else a[1])
        elif op.fn in ("add", "sub", "mul"):
            code = f"{a[0]} {dict(add='+', sub='-', mul='*')[op.fn]} {a[1]}"
        elif op.fn == "neg":
            code = f"-{a[0]}"
        elif op.fn == "row_sum":
            code = dialect.row_sum(a[0])
        elif op.fn == "column_sum":
            code = dialect.column_sum(a[0])
        elif op.fn == "row_mean":
            code = dialect.row_mean(a[0])
        elif op.fn == "spread":
            code = dialect.spread(a[0], a[1])
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


def minibatch(net: online.MemoryNetwork, keep: bool, momentum: bool, residual: bool, readout: str) -> MiniBatch:
    """The dual form of chunk.py for one mini-batch: the key rows' forward and loss gradients at the start
    weights, the query rows read with each row's weights, the read-out, the weights at the end."""
    p = TileProgram()
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
    return MiniBatch(p, {"x": x, "v": v, "x_q": x_q}, state, fixed, coefficients, out, end_state, deltas)


def backward(batch: MiniBatch) -> tuple[list[Tile], dict[str, Tile]]:
    """Append the mini-batch's reverse mode: (the adjoint inputs: d_out, then d_<part>_end for every live state
    part; the adjoint of every input by name: rows, state, layer norm and coefficients)."""
    p = batch.program
    d_out = p.input("d_out", batch.out.shape)
    d_ends = [p.input(f"d_{t.name}_end", t.shape) for t in batch.state]
    seeds = {batch.out.name: d_out, **{end.name: d for end, d in zip(batch.end_state, d_ends)}}
    wrt = [*batch.rows.values(), *batch.state, *batch.fixed, *batch.coefficients]
    return [d_out, *d_ends], p.adjoints(seeds, wrt, prefix="b_")
