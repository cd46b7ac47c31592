"""Print canonical matrix polynomials as Triton code on register tiles.

Inside a kernel program every K x V matrix is a [BK, BV] tile, a key-side vector a [BK] block, a
value-side vector a [BV] block and a scalar a scalar. A product broadcasts its operands into the
[BK, BV] frame and reduces over the contracted axis with `tl.sum`; outer products are plain
broadcasts. K x K matrices and inverses have no tile here: a rule that needs them raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from ..derive.algebra import K, V
from .torch_printer import Operand, TokenProgram

_FRAME = (K, V)  # axis 0 holds key channels, axis 1 value channels


def _in_frame(op: Operand) -> str:
    if len(op.axes) == 1:
        return f"{op.code}[:, None]" if op.axes[0] == K else f"{op.code}[None, :]"
    return op.code


def _dim(op: Operand, index: int | None):
    return op.axes[index] if index is not None else 1


@dataclass
class TritonTokenProgram(TokenProgram):
    math_module: str = "tl"
    broadcast_coefficients: bool = False

    def _product(self, a: Operand, b: Operand, name: str) -> Operand:
        if a.inverse or b.inverse:
            raise NotImplementedError("Triton kernels take no matrix inverse (second-order rules)")
        rows, inner, cols = _dim(a, a.row), _dim(a, a.col), _dim(b, b.col)
        diagonal = a.row is not None and a.row == a.col
        if b.row is not None and b.row == b.col:  # x Diag(b): scale x along the key axis
            code = f"{a.code} * {b.code}" if len(a.axes) == 1 else f"{_in_frame(a)} * {_in_frame(b)}"
            self.cost += sp.Mul(*{d for d in (rows, inner) if d != 1})
            self.lines.append(f"{name} = {code}")
            return Operand(name, a.axes, a.row, a.col)
        if inner == 1:  # outer product
            if rows == cols:
                raise NotImplementedError(f"a {rows} x {cols} matrix has no [BK, BV] tile")
            code = f"{_in_frame(a)} * {_in_frame(b)}"
            result = Operand(name, _FRAME, _FRAME.index(rows), _FRAME.index(cols))
        elif diagonal:  # Diag(a) x: scale x along the key axis
            code = f"{a.code} * {b.code}" if len(b.axes) == 1 else f"{_in_frame(a)} * {_in_frame(b)}"
            result = Operand(name, b.axes, b.row, b.col)
        elif len(a.axes) == 1 and len(b.axes) == 1:  # row . column
            code = f"tl.sum({a.code} * {b.code}, axis=0)"
            result = Operand(name, (), None, None)
        else:  # reduce over the contracted axis of the [BK, BV] frame
            code = f"tl.sum({_in_frame(a)} * {_in_frame(b)}, axis={_FRAME.index(inner)})"
            remaining = rows if rows != 1 else cols
            result = Operand(name, (remaining,), 0 if rows != 1 else None, 0 if rows == 1 else None)
        self.cost += sp.Mul(*{d for d in (rows, inner, cols) if d != 1})
        self.lines.append(f"{name} = {code}")
        return result


@dataclass
class TritonRowProgram(TokenProgram):
    """A per-token scalar for a block of rows: vectors are [rows, BK] tiles, scalars [rows] vectors.

    Only dot products of two key-side vectors are printed (a row-wise `tl.sum`); anything else raises,
    so a coefficient this cannot print stays on the host.
    """

    math_module: str = "tl"
    broadcast_coefficients: bool = False

    def _product(self, a: Operand, b: Operand, name: str) -> Operand:
        if a.inverse or b.inverse or a.axes != (K,) or b.axes != (K,) or a.col is None or b.row is None:
            raise NotImplementedError("only key . key products have a row-wise form")
        self.cost += K
        self.lines.append(f"{name} = tl.sum({a.code} * {b.code}, axis=1)")
        return Operand(name, (), None, None)


def load_line(name: str, position: str, per_key: bool = False, lanes: str = "") -> str:
    """`<name>_<suffix> = ...`: one input's values for the fused recurrent kernel's current token, in float32.

    position: "head" (fixed per head, loaded once), "row" (the token's row) or "step" (its sub-step row).
    Per key channel (or lanes "V" for the value) it is a [BK] or [BV] block with its lane mask."""
    lanes = lanes or ("K" if per_key else "")
    offset = {"head": "i_h", "row": "(row * H + i_h)", "step": "(step * H + i_h)"}[position]
    block = {"K": " * K + o_k, mask=m_k, other=0.0", "V": " * V + o_v, mask=m_v, other=0.0", "": ""}[lanes]
    suffix = "h" if position == "head" else "t"
    return f"{name}_{suffix} = tl.load({name} + {offset}{block}).to(tl.float32)"


def exp_line(leaf: str, gate_code: str) -> str:
    """A per-key retention vector from its log-gate's block."""
    return f"{leaf} = tl.exp({gate_code})"


__all__ = ["TritonRowProgram", "TritonTokenProgram", "exp_line", "load_line"]
