"""Print canonical matrix polynomials as batched PyTorch code.

Every tensor carries leading batch dimensions ([B, H], or [H] for per-head inputs): a column or row
vector is stored as [..., n], a matrix as [..., m, n], a diagonal as its vector, and a scalar as [...].
A chain of leaves is multiplied in the order that costs least (matrix-chain dynamic programming), each
pairwise product printed as one `torch.einsum`; products and coefficients are named temporaries,
computed once per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp
from sympy import DiagMatrix, Inverse, MatrixSymbol, Transpose
from sympy.printing.pycode import PythonCodePrinter

from ..derive.algebra import Inner, K, MatPoly

_COST_SIZES = {K: 64, sp.Symbol("V", integer=True, positive=True): 64}


@dataclass(frozen=True)
class Operand:
    """A value in a chain: `axes` are the stored dimensions; row/col index them (None: size 1)."""

    code: str
    axes: tuple  # dimension symbols of the stored tensor
    row: int | None
    col: int | None
    inverse: bool = False  # a matrix to solve with, not multiply by

    @property
    def rank(self) -> int:
        return len(self.axes)


def _inverse(leaf) -> bool:
    """An inverse, or the transpose of one."""
    return isinstance(leaf, Inverse) or (isinstance(leaf, Transpose) and isinstance(leaf.arg, Inverse))


def _solve_matrix(operand: Operand) -> str:
    """The matrix to solve with for an inverse operand: its own, or its transpose where the operand's axes
    are swapped (an inverse's transpose)."""
    swapped = (operand.row, operand.col) != (0, 1)
    return f"{operand.code}.transpose(-1, -2)" if swapped else operand.code


def _token(leaf) -> str:
    if isinstance(leaf, Transpose):
        return _token(leaf.arg) + "T"
    if isinstance(leaf, DiagMatrix):
        return _token(leaf.args[0])
    if isinstance(leaf, Inverse):
        return "inv_" + _token(leaf.arg)
    return leaf.name


class _ScalarPrinter(PythonCodePrinter):
    """SymPy scalars as torch (or Triton) expressions; names come from a mapping."""

    def __init__(self, names: dict[str, str], math_module: str = "torch"):
        super().__init__({"strict": True, "fully_qualified_modules": False})
        self.names = names
        self.math_module = math_module

    def _print_Symbol(self, expr):
        return self.names.get(expr.name, expr.name)

    def _print_exp(self, expr):
        return f"{self.math_module}.exp({self._print(expr.args[0])})"

    def _print_log(self, expr):
        # log(1 - x), a forget fraction's log-retention, is log1p(-x): exact for small x.
        argument = expr.args[0]
        rest = argument - 1
        if rest.could_extract_minus_sign():
            return f"{self.math_module}.log1p({self._print(rest)})"
        return f"{self.math_module}.log({self._print(argument)})"

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Inner(self, expr):
        raise ValueError("Inner scalars are replaced by temporaries before printing")

    def _print_Frobenius(self, expr):
        """<A, B> = tr(A^T B) of two matrix symbols: a sum over their last two axes."""
        a, b = (self.names[x.name] for x in expr.args)
        return f"({a} * {b}).sum((-2, -1))"


@dataclass
class TokenProgram:
    """Lines of one token's computation, with the temporaries already computed."""

    names: dict[str, str]  # leaf / symbol name -> code expression
    dims: dict  # dimension symbol -> code name ("K", "V")
    python_scalars: frozenset[str] = frozenset()  # symbols that are plain numbers, not [B, H] tensors
    math_module: str = "torch"
    broadcast_coefficients: bool = True  # coefficients are [B, H] tensors that need trailing unit axes
    # How A^-1 b is printed: an exact solve, or a spec's iterative solver (e.g. "_conjugate_gradient({matrix},
    # {rhs}, 8)", a helper the template defines).
    solve_code: str = "torch.linalg.solve({matrix}, {rhs})"
    lines: list[str] = field(default_factory=list)
    memo: dict = field(default_factory=dict)  # chain -> temporary name
    cost: sp.Expr = sp.Integer(0)
    _counter: int = 0

    # --- leaves and chains ----------------------------------------------------------------------
    def operand(self, leaf) -> Operand:
        if isinstance(leaf, Transpose):
            inner = self.operand(leaf.arg)
            return Operand(inner.code, inner.axes, inner.col, inner.row, inner.inverse)
        if isinstance(leaf, DiagMatrix):
            inner = self.operand(leaf.args[0])
            return Operand(inner.code, inner.axes, 0, 0)
        if isinstance(leaf, Inverse):
            inner = self.operand(leaf.arg)
            return Operand(inner.code, inner.axes, inner.row, inner.col, inverse=True)
        rows, cols = leaf.shape
        code = self.names[leaf.name]
        if cols == 1:
            return Operand(code, (rows,), 0, None)
        return Operand(code, (rows, cols), 0, 1)

    def chain(self, chain: tuple) -> Operand:
        if len(chain) == 1:
            return self.operand(chain[0])
        if chain in self.memo:
            return self.memo[chain]
        if chain[0].shape[0] == 1 and any(_inverse(leaf) for leaf in chain):
            # A row through an inverse, x^T A^-1, is the transpose of the column A^-T x: one solve, shared
            # with any other use of that column.
            column = self.chain(tuple(leaf.T for leaf in reversed(chain)))
            self.memo[chain] = Operand(column.code, column.axes, column.col, column.row)
            return self.memo[chain]
        split = self._best_split(chain)
        left, right = self.chain(chain[:split]), self.chain(chain[split:])
        name = "_".join(_token(leaf) for leaf in chain)
        result = self._product(left, right, name)
        self.memo[chain] = result
        return result

    def _best_split(self, chain: tuple) -> int:
        # An inverse is applied by solving with what stands to its right, so that part goes first; in an outer
        # product (a column, then a row) each side solves on its own (a row through an inverse as the
        # transposed column), so it splits there first.
        inverses = [i for i, leaf in enumerate(chain) if _inverse(leaf)]
        if inverses:
            for split in range(1, len(chain)):
                if chain[split - 1].shape[1] == 1 and chain[split].shape[0] == 1:
                    return split
            return 1 if inverses[0] == 0 else inverses[0]
        best = None
        for split in range(1, len(chain)):
            cost = self._chain_cost(chain[:split]) + self._chain_cost(chain[split:]) + self._pair_cost(
                chain[:split], chain[split:])
            if best is None or cost < best[0]:
                best = (cost, split)
        return best[1]

    def _chain_cost(self, chain: tuple) -> int:
        if len(chain) == 1:
            return 0
        return min(self._chain_cost(chain[:s]) + self._chain_cost(chain[s:]) + self._pair_cost(chain[:s], chain[s:])
                   for s in range(1, len(chain)))

    @staticmethod
    def _pair_cost(left: tuple, right: tuple) -> int:
        def size(d):
            return _COST_SIZES.get(d, 1)
        rows, inner, cols = left[0].shape[0], left[-1].shape[1], right[-1].shape[1]
        diag = isinstance(left[-1], DiagMatrix) or isinstance(right[0], DiagMatrix)
        return size(rows) * size(cols) * (1 if diag else size(inner))

    def _product(self, a: Operand, b: Operand, name: str) -> Operand:
        if a.inverse:
            code = self.solve_code.format(matrix=_solve_matrix(a), rhs=b.code)
            result = Operand(name, b.axes, b.row, b.col)
            n = a.axes[0]
            self.cost += n**3 / 3 + n**2 * sp.Mul(*[d for d in b.axes if d != n] or [1])
            self.lines.append(f"{name} = {code}")
            return result
        if b.inverse:  # a row through an inverse goes through its transposed column (see chain)
            raise NotImplementedError("a matrix times an inverse is not printed")
        used: list[str] = []

        def letter(dim) -> str:
            for candidate in ([str(dim).lower()] if str(dim) in ("K", "V") else []) + list("ijlmn"):
                if candidate not in used:
                    used.append(candidate)
                    return candidate
            raise AssertionError("out of einsum letters")

        a_letters = [None] * a.rank
        b_letters = [None] * b.rank
        # The contracted (or, for a diagonal, shared) dimension.
        shared = letter(a.axes[a.col]) if a.col is not None else None
        if a.col is not None:
            a_letters[a.col] = shared
        if b.row is not None:
            b_letters[b.row] = shared
        for i, dim in enumerate(a.axes):
            if a_letters[i] is None:
                a_letters[i] = letter(dim)
        for i, dim in enumerate(b.axes):
            if b_letters[i] is None:
                b_letters[i] = letter(dim)
        out_row = a_letters[a.row] if a.row is not None else None
        out_col = b_letters[b.col] if b.col is not None else None
        out = [x for x in (out_row, out_col) if x is not None]
        if out_row is not None and out_row == out_col:  # diag times vector
            out = [out_row]
        spec = f"...{''.join(a_letters)},...{''.join(b_letters)}->...{''.join(out)}"
        dims = {}
        for ls, op in ((a_letters, a), (b_letters, b)):
            for letter_, dim in zip(ls, op.axes):
                dims[letter_] = dim
        self.cost += sp.Mul(*dims.values())
        if not out and len(a_letters) == len(b_letters) == 1:
            # A batched dot product: einsum would route it through a batched matmul of 1 x K by K x 1 (one
            # tiny gemv per row on a GPU); an element-wise product and a sum read the operands once.
            self.lines.append(f"{name} = ({a.code} * {b.code}).sum(-1)")
        else:
            self.lines.append(f'{name} = torch.einsum("{spec}", {a.code}, {b.code})')
        axes = tuple(dims[x] for x in out)
        if len(out) == 2:
            return Operand(name, axes, 0, 1)
        if len(out) == 1:
            return Operand(name, axes, 0 if out_row is not None else None, 0 if out_row is None else None)
        return Operand(name, (), None, None)

    # --- scalars and polynomials -----------------------------------------------------------------
    def scalar(self, expr: sp.Expr) -> str:
        replacements = {}
        for inner in sorted(expr.atoms(Inner), key=sp.srepr):
            value = self.chain(tuple(inner.args))
            replacements[inner] = sp.Symbol(value.code)
        printer = _ScalarPrinter(self.names, self.math_module)
        return printer.doprint(expr.xreplace(replacements))

    def temporary(self, expr: sp.Expr, stem: str) -> str:
        """A named temporary for a non-trivial coefficient, so the update line stays short."""
        code = self.scalar(expr)
        if expr.is_Symbol or expr.is_number:
            return code
        key = ("coefficient", expr)
        if key not in self.memo:
            self.memo[key] = Operand(f"{stem}{self._counter}", (), None, None)
            self._counter += 1
            self.lines.append(f"{self.memo[key].code} = {code}")
        return self.memo[key].code

    def poly(self, value: MatPoly) -> str:
        """An expression for `value` (temporaries are appended to self.lines first)."""
        rank = (value.rows != 1) + (value.cols != 1)
        parts = []
        for chain, coeff in value.terms:
            if chain == () and rank == 0:
                parts.append(("", self.scalar(coeff)))
                continue
            if chain == ():
                term = f"torch.eye({self.dims[value.rows]}, dtype=acc, device=q.device)"
                operand = Operand(term, (value.rows, value.cols), 0, 1)
            elif len(chain) == 1 and isinstance(chain[0], DiagMatrix):
                operand = Operand(f"torch.diag_embed({self.operand(chain[0]).code})", (value.rows, value.cols), 0, 1)
            else:
                operand = self.chain(chain)
            numeric = coeff.is_number
            sign = ""
            if numeric and coeff < 0:
                sign, coeff = "-", -coeff
            elif not numeric and not coeff.is_Add and coeff.as_coeff_Mul()[0] < 0:
                sign, coeff = "-", -coeff
            if coeff == 1:
                term = operand.code
            elif numeric or {x.name for x in coeff.free_symbols} <= self.python_scalars:
                term = f"{self.scalar(coeff)} * {operand.code}"
            else:
                factor = self.temporary(coeff, "c")
                broadcast = _unsqueeze(rank) if rank and self.broadcast_coefficients else ""
                term = f"{factor}{broadcast} * {operand.code}"
            parts.append((sign, term))
        if not parts:
            return "0"
        text = ("-" if parts[0][0] else "") + parts[0][1]
        for sign, term in parts[1:]:
            text += f" {'-' if sign else '+'} {term}"
        return text

    def forget(self, state: str) -> None:
        """A state was reassigned: products that read its old value are stale."""
        def reads(key) -> bool:
            parts = key[1:] if key[0] == "coefficient" else key
            return any(state in {m.name for m in part.atoms(MatrixSymbol)} for part in parts)
        self.memo = {key: value for key, value in self.memo.items() if not reads(key)}


def _unsqueeze(rank: int) -> str:
    return "[..., " + ", ".join(["None"] * rank) + "]"
