"""A canonical form for the matrix expressions of a per-token update.

SymPy differentiates the regression objective; this module turns its result into a `MatPoly`: a sum of
terms `coefficient * L1 L2 ... Ln`, where each L is a leaf (a matrix or vector symbol, a transpose, a
diagonal, an inverse) and the coefficient is a SymPy scalar. Any run `row ... col` inside a chain is a
1x1 matrix and becomes the scalar `Inner(row, ..., col)` in the coefficient. On this form the rewrites
(taking a step, Sherman-Morrison, substitution) and the structure classification are plain dictionary
operations, and every result is canonical, so it prints the same bytes on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp
from sympy import DiagMatrix, Identity, Inverse, MatrixSymbol, Transpose, ZeroMatrix

K, V = sp.symbols("K V", integer=True, positive=True)


class Inner(sp.Function):
    """The scalar value of a 1x1 chain, e.g. Inner(k.T, k) = k^T k, Inner(k.T, P, k) = k^T P k."""

    is_commutative = True
    is_real = True

    def _latex(self, printer):
        return " ".join(printer._print(a) for a in self.args)

    def _sympystr(self, printer):
        return "(" + " ".join(leaf_text(a) for a in self.args) + ")"


Chain = tuple  # a tuple of leaves; () is the identity


# --- math as a reader writes it (ttr explain, docstrings): k k^T S, Diag(exp(g)), (k^T k) -------------------


def leaf_text(leaf) -> str:
    """A chain's leaf: k, k^T, Diag(exp(g)), (I + beta k k^T)^-1."""
    if isinstance(leaf, Transpose):
        inner = leaf_text(leaf.arg)
        return f"{inner}^T" if isinstance(leaf.arg, MatrixSymbol) else f"({inner})^T"
    if isinstance(leaf, DiagMatrix):
        return f"Diag({leaf_text(leaf.args[0])})"
    if isinstance(leaf, Inverse):
        inner = leaf_text(leaf.arg)
        return f"{inner}^-1" if isinstance(leaf.arg, MatrixSymbol) else f"({inner})^-1"
    if isinstance(leaf, Identity):
        return "I"
    if isinstance(leaf, MatrixSymbol):
        # A per-key gate's leaf exp_<g> holds exp(g) entry by entry (see the derivation's vectors).
        return f"exp({leaf.name[4:]})" if leaf.name.startswith("exp_") else leaf.name
    if isinstance(leaf, sp.MatrixExpr):
        return str(MatPoly.from_expr(leaf))
    return sp.sstr(leaf)


def scaled_text(coefficient: sp.Expr, factors: str) -> str:
    """`coefficient factors` as written: `S`, `-beta k k^T S`, `(1 - alpha) S`."""
    if coefficient == 1:
        return factors
    leading = coefficient.args[0] if coefficient.is_Mul else coefficient
    if leading.is_Number and leading < 0:  # -beta, -2 (but 1 - alpha stays as written)
        return "-" + scaled_text(-coefficient, factors)
    text = sp.sstr(coefficient)
    return f"({text}) {factors}" if isinstance(coefficient, sp.Add) else f"{text} {factors}"


def shape(leaf) -> tuple:
    return tuple(leaf.shape)


def _is_row(leaf) -> bool:
    return shape(leaf)[0] == 1


def _is_col(leaf) -> bool:
    return shape(leaf)[1] == 1


def _canonical_leaf(leaf, symmetric: frozenset[str]):
    if isinstance(leaf, Transpose) and isinstance(leaf.arg, (DiagMatrix,)):
        return leaf.arg
    if isinstance(leaf, Transpose) and isinstance(leaf.arg, MatrixSymbol) and leaf.arg.name in symmetric:
        return leaf.arg
    if isinstance(leaf, Transpose) and isinstance(leaf.arg, Inverse) and leaf.arg.arg.name in symmetric:
        return leaf.arg
    return leaf


def _transpose(leaf, symmetric: frozenset[str]):
    if isinstance(leaf, Transpose):
        return leaf.arg
    return _canonical_leaf(Transpose(leaf), symmetric)


def _cancel_inverses(chain: list) -> list:
    """Drop adjacent X X^{-1} and X^{-1} X pairs."""
    i = 0
    while i + 1 < len(chain):
        a, b = chain[i], chain[i + 1]
        if (isinstance(b, Inverse) and b.arg == a) or (isinstance(a, Inverse) and a.arg == b):
            del chain[i:i + 2]
            i = max(i - 1, 0)
        else:
            i += 1
    return chain


def _contract(chain: Chain, symmetric: frozenset[str]) -> tuple[sp.Expr, Chain]:
    """Replace every 1x1 run (row vector ... column vector) by an Inner scalar."""
    factor = sp.Integer(1)
    chain = _cancel_inverses(list(chain))
    i = 0
    while i < len(chain):
        if _is_row(chain[i]) and not _is_col(chain[i]):
            j = i + 1
            while j < len(chain) and not _is_row(chain[j]) and not _is_col(chain[j]):
                j += 1
            if j < len(chain) and _is_col(chain[j]) and not _is_row(chain[j]):
                run = tuple(chain[i:j + 1])
                mirrored = tuple(_transpose(leaf, symmetric) for leaf in reversed(run))
                run = min(run, mirrored, key=lambda r: [sp.srepr(x) for x in r])
                factor *= Inner(*run)
                del chain[i:j + 1]
                continue
        i += 1
    return factor, tuple(chain)


def _tidy(coeff: sp.Expr) -> sp.Expr:
    """A short, canonical form of a scalar coefficient."""
    cancelled = sp.cancel(sp.together(coeff))
    factored = sp.factor(cancelled)
    if factored.could_extract_minus_sign() and not cancelled.could_extract_minus_sign():
        return cancelled
    return factored if sp.count_ops(factored) <= sp.count_ops(cancelled) else cancelled


@dataclass(frozen=True)
class MatPoly:
    """sum(coefficient * chain): a matrix expression in canonical form."""

    rows: object
    cols: object
    terms: tuple[tuple[Chain, sp.Expr], ...]
    symmetric: frozenset[str] = frozenset()

    # --- construction -------------------------------------------------------------------------
    @staticmethod
    def build(rows, cols, items, symmetric=frozenset()) -> MatPoly:
        collected: dict[Chain, sp.Expr] = {}
        for chain, coeff in items:
            extra, chain = _contract(tuple(_canonical_leaf(x, symmetric) for x in chain), symmetric)
            collected[chain] = collected.get(chain, sp.Integer(0)) + coeff * extra
        terms = []
        for chain, coeff in collected.items():
            coeff = _tidy(coeff)
            if coeff != 0:
                terms.append((chain, coeff))
        terms.sort(key=lambda item: (len(item[0]), [sp.srepr(x) for x in item[0]]))
        return MatPoly(rows, cols, tuple(terms), symmetric)

    @staticmethod
    def from_expr(expr, symmetric=frozenset()) -> MatPoly:
        rows, cols = expr.shape
        expr = sp.expand(expr.doit())
        items = []
        for term in (expr.args if isinstance(expr, sp.MatAdd) else (expr,)):
            if isinstance(term, ZeroMatrix):
                continue
            parts = term.args if isinstance(term, sp.MatMul) else (term,)
            coeff = sp.Mul(*[p for p in parts if not p.is_Matrix])
            chain = []
            for p in parts:
                if p.is_Matrix and not isinstance(p, Identity):
                    if isinstance(p, (sp.MatMul, sp.MatAdd)):
                        raise ValueError(f"not in canonical form: {p}")
                    chain.append(p)
            items.append((tuple(chain), coeff))
        return MatPoly.build(rows, cols, items, symmetric)

    @staticmethod
    def leaf(symbol, symmetric=frozenset()) -> MatPoly:
        return MatPoly.build(symbol.shape[0], symbol.shape[1], [((symbol,), sp.Integer(1))], symmetric)

    @staticmethod
    def identity(n, symmetric=frozenset(), scale=1) -> MatPoly:
        return MatPoly.build(n, n, [((), sp.sympify(scale))], symmetric)

    # --- arithmetic ---------------------------------------------------------------------------
    def __add__(self, other: MatPoly) -> MatPoly:
        return MatPoly.build(self.rows, self.cols, self.terms + other.terms, self.symmetric | other.symmetric)

    def __neg__(self) -> MatPoly:
        return self.scaled(-1)

    def __sub__(self, other: MatPoly) -> MatPoly:
        return self + (-other)

    def scaled(self, scalar) -> MatPoly:
        return MatPoly.build(self.rows, self.cols, [(c, k * scalar) for c, k in self.terms], self.symmetric)

    def __matmul__(self, other: MatPoly) -> MatPoly:
        items = [(a + b, ka * kb) for a, ka in self.terms for b, kb in other.terms]
        return MatPoly.build(self.rows, other.cols, items, self.symmetric | other.symmetric)

    def T(self) -> MatPoly:  # noqa: N802 -- the usual name of a transpose
        items = [(tuple(_transpose(leaf, self.symmetric) for leaf in reversed(chain)), coeff)
                 for chain, coeff in self.terms]
        return MatPoly.build(self.cols, self.rows, items, self.symmetric)

    def factor_prefix(self, prefix: Chain) -> tuple[MatPoly, MatPoly]:
        """Write self = rest + prefix @ suffix, collecting every term whose chain starts with `prefix`."""
        rest, suffix = [], []
        for chain, coeff in self.terms:
            if chain[:len(prefix)] == tuple(prefix):
                suffix.append((chain[len(prefix):], coeff))
            else:
                rest.append((chain, coeff))
        inner_rows = prefix[-1].shape[1]
        return (MatPoly.build(self.rows, self.cols, rest, self.symmetric),
                MatPoly.build(inner_rows, self.cols, suffix, self.symmetric))

    def rewrite_pair(self, old: Chain, new: Chain) -> MatPoly:
        """Replace every occurrence of the run `old` inside a chain by `new` (an identity of matrices)."""
        items = []
        for chain, coeff in self.terms:
            chain = list(chain)
            i = 0
            while i + len(old) <= len(chain):
                if tuple(chain[i:i + len(old)]) == tuple(old):
                    chain[i:i + len(old)] = list(new)
                    i += len(new)
                else:
                    i += 1
            items.append((tuple(chain), coeff))
        return MatPoly.build(self.rows, self.cols, items, self.symmetric)

    def subs_scalar(self, mapping: dict) -> MatPoly:
        return MatPoly.build(self.rows, self.cols, [(c, k.subs(mapping)) for c, k in self.terms], self.symmetric)

    def substitute(self, symbol, replacement: MatPoly) -> MatPoly:
        """Replace every occurrence of the leaf `symbol` (not its transpose) by a polynomial."""
        result = MatPoly(self.rows, self.cols, (), self.symmetric | replacement.symmetric)
        for chain, coeff in self.terms:
            product = None
            for leaf in chain:
                factor = replacement if leaf == symbol else MatPoly.leaf(leaf, result.symmetric)
                product = factor if product is None else product @ factor
            product = product.scaled(coeff) if product is not None else MatPoly.identity(self.rows, result.symmetric, coeff)
            result = result + product
        return result

    def split_on(self, symbol) -> tuple[MatPoly, MatPoly]:
        """Write self = A @ symbol + B, for terms whose chain ends in `symbol` (A may be the identity)."""
        a_items, b_items = [], []
        for chain, coeff in self.terms:
            if chain and chain[-1] == symbol:
                a_items.append((chain[:-1], coeff))
            else:
                b_items.append((chain, coeff))
        a = MatPoly.build(self.rows, symbol.shape[0], a_items, self.symmetric)
        b = MatPoly.build(self.rows, self.cols, b_items, self.symmetric)
        return a, b

    def scalar(self) -> sp.Expr:
        """The value of a 1x1 polynomial."""
        assert all(chain == () for chain, _ in self.terms), self
        return sp.Add(*[coeff for _, coeff in self.terms])

    def coefficient(self, chain: Chain) -> sp.Expr:
        return dict(self.terms).get(tuple(chain), sp.Integer(0))

    def chains(self) -> list[Chain]:
        return [chain for chain, _ in self.terms]

    def to_expr(self):
        parts = []
        for chain, coeff in self.terms:
            if chain:
                parts.append(sp.MatMul(coeff, *chain)) if coeff != 1 else parts.append(
                    sp.MatMul(*chain) if len(chain) > 1 else chain[0])
            else:
                parts.append(coeff * Identity(self.rows))
        if not parts:
            return ZeroMatrix(self.rows, self.cols)
        return sp.MatAdd(*parts) if len(parts) > 1 else parts[0]

    def __str__(self) -> str:
        if self.rows == 1 and self.cols == 1 and all(chain == () for chain, _ in self.terms):
            return sp.sstr(self.scalar())
        if not self.terms:
            return "0"
        text = ""
        for chain, coefficient in self.terms:
            term = scaled_text(coefficient, " ".join(leaf_text(x) for x in chain) or "I")
            text += (" - " + term[1:] if term.startswith("-") else " + " + term) if text else term
        return text

    def latex(self) -> str:
        """Term by term, as __str__ joins them (SymPy prints a sum's negative matrix term as "+ -")."""
        text = ""
        for term in self.terms:
            part = sp.latex(MatPoly(self.rows, self.cols, (term,), self.symmetric).to_expr())
            text += (" - " + part[1:].lstrip() if part.startswith("-") else " + " + part) if text else part
        return text or "0"


def sherman_morrison(a_inverse: MatPoly, u, w, s) -> MatPoly:
    """(A + s u w^T)^{-1} = A^{-1} - s A^{-1} u w^T A^{-1} / (1 + s w^T A^{-1} u)."""
    u_poly, w_t = MatPoly.leaf(u), MatPoly.leaf(Transpose(w))
    denominator = 1 + s * (w_t @ a_inverse @ u_poly).scalar()
    return a_inverse - (a_inverse @ u_poly @ w_t @ a_inverse).scaled(s / denominator)


def trace_gradient(terms, wrt) -> MatPoly:
    """Gradient of sum(coefficient * Trace(X)) with respect to a matrix symbol.

    Each trace is differentiated on its own: SymPy 1.14 returns 0 for some sums of traces.
    """
    gradient = ZeroMatrix(*wrt.shape)
    for coefficient, trace in terms:
        gradient = gradient + coefficient * trace.diff(wrt)
    return MatPoly.from_expr(gradient)
