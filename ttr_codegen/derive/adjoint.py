"""The adjoint of a derived per-token rule: its reverse-mode derivative, symbolically.

Training runs the recurrence backwards in time. With dS the adjoint of the state after a token (the
gradient of the loss with respect to it) and do the adjoint of the token's output, every input's
gradient is a vector-Jacobian product of the token's update or read-out:

    d x = d/dx [ <dS, update(S, k, v, beta, ...)> + <do, readout(S, q)> ],   <A, B> = tr(A^T B).

On the canonical form this is exact bookkeeping on chains: an occurrence L X R of a leaf X in a term
contributes L^T dS R^T (R dS^T L for an occurrence of X^T), and a per-key gate x inside Diag(x) gets the
diagonal of that, a `RowDot`. A coefficient that depends on an input through an inner product
(Longhorn's beta / (1 + beta k^T k)) adds the chain rule through that inner product (SymPy
differentiates the coefficient); a scalar input's gradient is the sum over terms of d(coefficient)/dx
times the term's pairing with dS. A pairing <dS, chain> is rotated (the trace is cyclic) to start at a
row vector, so it is an `Inner` like the forward's scalars; a chain with no vector (a decay term's S)
pairs through `Frobenius`.

A token's update may be several assignments (Titans: Z <- f_Z(Z, S, ...), then S <- f_S(S, Z)); they
are reversed last first, each adding to the adjoints of the states it reads and replacing its own.

A read-out may be several assignments too (mesa: h_reg = Diag(lamb) + h_kk, then o = h_kv^T h_reg^-1 q): do
flows back through them last first, each intermediate's adjoint d<I> becoming a symbol the next ones read.
An inverse's occurrence L A^-1 R gives -A^-T L^T G R^T A^-T.

A scalar state (affine_mesa's weight total omega) is a symbol of the coefficients, and so is its adjoint:
its gradients come from differentiating coefficients, like a scalar input's.

Scope: every recurrent rule of the catalogue (the linear family with per-key gates, momentum and
sub-steps; RLS, whose coefficients read its inverse covariance P through k^T P k; mesa and affine_mesa).
The attention forms (a weighted sum over all keys, no recurrence) raise NotImplementedError.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp
from sympy import DiagMatrix, Inverse, MatrixSymbol, Transpose

from .algebra import Inner, K, MatPoly, V, _tidy
from .derivation import q
from .rule import UpdateRule

OUTPUT_ADJOINT = MatrixSymbol("do", V, 1)  # the adjoint of the token's output


class Frobenius(sp.Function):
    """<A, B> = tr(A^T B) of two matrices of one shape: e.g. a decay's gradient <dS, S>."""

    is_commutative = True
    is_real = True

    def _sympystr(self, printer):
        return f"<{printer._print(self.args[0])}, {printer._print(self.args[1])}>"


@dataclass(frozen=True)
class RowDot:
    """The vector with entries sum_j left_ij right_ij: the gradient of a per-key gate vector x inside
    Diag(x) (the diagonal of left right^T)."""

    left: MatPoly
    right: MatPoly
    times: MatrixSymbol | None = None  # then the result times this vector, entry by entry

    def __str__(self) -> str:
        text = f"rowsum(({self.left}) o ({self.right}))"
        return f"{self.times} o {text}" if self.times is not None else text


@dataclass(frozen=True)
class AssignAdjoint:
    """The reverse of one assignment X <- f(states, inputs), with dX the adjoint of its result.

    `others` adds to the adjoint of each other state f reads; `inputs` are the gradients it contributes
    (MatPoly for vectors, RowDot for per-key gates, a SymPy scalar for scalars); then `target` replaces dX
    (the adjoint of X's previous value). All read the states' values before the assignment.
    """

    name: str
    others: dict
    inputs: dict
    target: MatPoly


@dataclass(frozen=True)
class Adjoint:
    """The reverse-mode step of one token (one sub-step for rules with several per token).

    `readout` adds the token's output to the adjoints of the states it reads (in do and q) and
    `readout_query` is dq (in do and the states after the token). `steps` reverse the update's
    assignments, last assignment first.
    """

    readout: dict
    readout_query: MatPoly
    steps: tuple[AssignAdjoint, ...]
    # A read-out in several assignments (mesa: h_reg = Diag(lamb) + h_kk, then o = h_kv^T h_reg^-1 q): the
    # adjoints d<I> of its intermediates, in the order they are computed (each may read the ones before),
    # and the gradients of the inputs it reads (per-head ridges).
    readout_intermediates: tuple = ()
    readout_inputs: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        """One token's reverse step in order, one line per gradient, for `ttr explain`."""
        rows = [f"d{name} = {value}  (the read-out's {name})" for name, value in self.readout_intermediates]
        rows += [f"d{name} += {value}  (the token's output)" for name, value in self.readout.items()]
        rows += [f"d{name} = {value}  (the read-out)" for name, value in self.readout_inputs.items()]
        rows.append(f"dq = {self.readout_query}  (the states after the token)")
        for step in self.steps:
            prefix = f"[{step.name}] " if len(self.steps) > 1 else ""
            rows += [f"{prefix}d{name} += {value}" for name, value in step.others.items()]
            rows += [f"{prefix}d{name} {'+=' if len(self.steps) > 1 else '='} {value}" for name, value in step.inputs.items()]
            rows.append(f"{prefix}d{step.name} <- {step.target}  (the adjoint of {step.name} before the assignment)")
        return rows


def pairing(adjoint: MatrixSymbol | sp.Symbol, chain: tuple) -> sp.Expr:
    """<adjoint, chain> as a scalar: tr(adjoint^T chain), rotated to start at a row vector. A scalar state's
    adjoint is a plain symbol: its chains are empty (a 1 x 1 product is already an inner product)."""
    if not isinstance(adjoint, MatrixSymbol):
        assert chain == (), chain
        return adjoint
    cycle = (Transpose(adjoint),) + tuple(chain)
    for start, leaf in enumerate(cycle):
        if leaf.shape[0] == 1:  # a row vector: the rotated cycle runs row ... column, a 1 x 1 chain
            rotated = cycle[start:] + cycle[:start]
            return MatPoly.build(1, 1, [(rotated, sp.Integer(1))]).scalar()
    if len(chain) == 1:
        return Frobenius(adjoint, chain[0])
    raise NotImplementedError(f"no adjoint pairing for the chain {chain}")


def _product(chain: tuple, rows) -> MatPoly:
    """A chain as a MatPoly (the identity of size `rows` when empty)."""
    if not chain:
        return MatPoly.identity(rows)
    return MatPoly.build(chain[0].shape[0], chain[-1].shape[1], [(tuple(chain), sp.Integer(1))])


def _chain_vjp(chain: tuple, adjoint: MatPoly, wrt) -> MatPoly | RowDot | None:
    """d/d wrt <adjoint, chain> for one chain: for each occurrence L X R, L^T adjoint R^T (transposed for
    an occurrence of X^T); for a diagonal Diag(x), the diagonal of that, a RowDot. None: wrt is absent."""
    total = None
    for i, leaf in enumerate(chain):
        left = _product(chain[:i], adjoint.rows)
        right = _product(chain[i + 1:], leaf.shape[1])
        if leaf == wrt:
            term = left.T() @ adjoint @ right.T()
        elif leaf == Transpose(wrt):
            term = right @ adjoint.T() @ left
        elif leaf == Inverse(wrt):  # d(A^-1) = -A^-1 dA A^-1: L A^-1 R gives -A^-T L^T G R^T A^-T
            inverse_t = MatPoly.leaf(Transpose(Inverse(wrt)))
            term = -(inverse_t @ left.T() @ adjoint @ right.T() @ inverse_t)
        elif leaf == Transpose(Inverse(wrt)):  # L A^-T R: the transpose of the above
            inverse = MatPoly.leaf(Inverse(wrt))
            term = -(inverse @ right @ adjoint.T() @ left @ inverse)
        elif isinstance(leaf, DiagMatrix) and leaf.args[0] == wrt:
            if total is not None:
                raise NotImplementedError(f"{wrt} appears twice in {chain}")
            return RowDot(left.T() @ adjoint, right)  # diag(L^T G R^T)_i = sum_j (L^T G)_ij R_ij
        else:
            continue
        total = term if total is None else total + term
    return total


def _coefficient_derivative(coeff: sp.Expr, wrt) -> list[tuple[sp.Expr, Inner]]:
    """(d coeff / d inner, inner) for every inner product in coeff that reads the matrix symbol `wrt`."""
    terms = []
    for inner in sorted(coeff.atoms(Inner), key=sp.srepr):
        if wrt in inner.atoms(MatrixSymbol):
            placeholder = sp.Dummy("inner")
            derivative = sp.diff(coeff.xreplace({inner: placeholder}), placeholder).xreplace({placeholder: inner})
            terms.append((derivative, inner))
    return terms


def vjp(poly: MatPoly, adjoint: MatrixSymbol, wrt: MatrixSymbol) -> MatPoly | RowDot:
    """d/d wrt <adjoint, poly>, with the chain rule through coefficients' inner products."""
    adjoint_poly = MatPoly.leaf(adjoint) if isinstance(adjoint, MatrixSymbol) else None  # None: a scalar state's
    result = MatPoly.build(*wrt.shape, [])
    diagonal = []  # per-key vectors: (a RowDot, its coefficient) from each term whose diagonal holds wrt
    for chain, coeff in poly.terms:
        direct = _chain_vjp(chain, adjoint_poly, wrt) if adjoint_poly is not None else None
        if isinstance(direct, RowDot):
            diagonal.append((direct, coeff))
        elif direct is not None:
            result = result + direct.scaled(coeff)
        for derivative, inner in _coefficient_derivative(coeff, wrt):
            through_inner = _chain_vjp(tuple(inner.args), MatPoly.identity(1), wrt)
            result = result + through_inner.scaled(derivative * pairing(adjoint, chain))
    if diagonal:
        if result.terms:
            raise NotImplementedError(f"{wrt} both inside and outside diagonals has no adjoint here yet")
        # Terms that share the right factor add their left factors (e.g. KDA's Diag(d) S - b k k^T Diag(d) S:
        # rowsum((G - b k k^T G) o S)); terms that share the left one add their right factors (a step per key,
        # Diag(a) k v^T - Diag(a) k k^T S: rowsum(G o (k v^T - k k^T S))).
        if len({d.right for d, _ in diagonal}) == 1:
            return RowDot(_sum(d.left.scaled(c) for d, c in diagonal), diagonal[0][0].right)
        if len({d.left for d, _ in diagonal}) == 1:
            return RowDot(diagonal[0][0].left, _sum(d.right.scaled(c) for d, c in diagonal))
        raise NotImplementedError(f"{wrt} in diagonals with different left and right factors has no adjoint here yet")
    return result


def _sum(polys) -> MatPoly:
    polys = list(polys)
    total = polys[0]
    for poly in polys[1:]:
        total = total + poly
    return total


def vjp_scalar(poly: MatPoly, adjoint: MatrixSymbol, wrt: sp.Symbol) -> sp.Expr:
    """d/d wrt <adjoint, poly> for a scalar symbol (a step size, a log-gate)."""
    total = sp.Integer(0)
    for chain, coeff in poly.terms:
        derivative = sp.diff(coeff, wrt)
        if derivative != 0:
            total += derivative * pairing(adjoint, chain)
    return _tidy(total)


def derive_adjoint(rule: UpdateRule) -> Adjoint:
    """The adjoint of a recurrent rule whose states are matrices or vectors of K and V, or scalars (see the
    module's scope)."""
    if rule.form != "recurrent":
        raise NotImplementedError(f"{rule.name}: only recurrent rules have an adjoint here")
    size = {"K": K, "V": V, "1": 1}
    # A matrix or vector state is a leaf of the chains; a scalar one (affine_mesa's weight total) is a symbol
    # of the coefficients, and so is its adjoint.
    symbols = {x.name: x for a in (*rule.update, *rule.readout) for _, c in a.value.terms for x in c.free_symbols}
    leaves_of, scalars_of = {}, {}
    for state in rule.states:
        if (state.rows, state.cols) == ("1", "1"):
            scalars_of[state.name] = symbols.get(state.name, sp.Symbol(state.name))
        else:
            leaves_of[state.name] = MatrixSymbol(state.name, size[state.rows], size[state.cols])
    adjoints = {name: MatrixSymbol(f"d{name}", *leaf.shape) for name, leaf in leaves_of.items()}
    adjoints |= {name: sp.Symbol(f"d{name}") for name in scalars_of}
    gates = dict(rule.vectors)  # a per-key gate leaf exp_g -> its log-gate input g
    steps = []
    for assign in reversed(rule.update):
        f, adjoint = assign.value, adjoints[assign.target]
        read = _leaves(f)
        coefficient_symbols = {x for _, coeff in f.terms for x in coeff.free_symbols
                               if isinstance(x, sp.Symbol) and not isinstance(x, MatrixSymbol) and x not in (K, V)}
        others = {name: vjp(f, adjoint, leaf) for name, leaf in leaves_of.items()
                  if name != assign.target and leaf in read}
        others |= {name: vjp_scalar(f, adjoint, symbol) for name, symbol in scalars_of.items()
                   if name != assign.target and symbol in coefficient_symbols}
        inputs: dict = {}
        for leaf in sorted(read - set(leaves_of.values()), key=lambda x: x.name):
            gradient = vjp(f, adjoint, leaf)
            if leaf.name in gates:  # d g = exp(g) o d exp_g
                inputs[gates[leaf.name]] = RowDot(gradient.left, gradient.right, times=leaf)
            else:
                inputs[leaf.name] = gradient
        for symbol in sorted(coefficient_symbols - set(scalars_of.values()), key=lambda x: x.name):
            inputs[symbol.name] = vjp_scalar(f, adjoint, symbol)
        target = (vjp_scalar(f, adjoint, scalars_of[assign.target]) if assign.target in scalars_of
                  else vjp(f, adjoint, leaves_of[assign.target]))
        steps.append(AssignAdjoint(assign.target, others, inputs, target))
    return _readout_adjoint(rule, leaves_of, scalars_of, tuple(steps))


def _readout_adjoint(rule: UpdateRule, leaves_of: dict, scalars_of: dict, steps: tuple) -> Adjoint:
    """The read-out's reverse, last assignment first: the output's adjoint do flows into the states, q, the
    intermediates (each then passes its adjoint d<I> on, as a symbol the lowering computes first) and the
    inputs it reads."""
    final = rule.readout[-1]
    found: dict = {}  # name -> its adjoint so far: states, intermediates, q and the inputs the read-out reads

    def add(name: str, gradient) -> None:
        if name not in found:
            found[name] = gradient
        elif isinstance(gradient, RowDot) or isinstance(found[name], RowDot):
            raise NotImplementedError(f"{name} in several diagonals of the read-out has no adjoint here yet")
        else:
            found[name] = found[name] + gradient

    computed = []
    for assign in reversed(rule.readout):
        if assign is final:
            adjoint = OUTPUT_ADJOINT
        else:
            computed.append((assign.target, found.pop(assign.target)))
            adjoint = MatrixSymbol(f"d{assign.target}", assign.value.rows, assign.value.cols)
        for name, symbol in scalars_of.items():  # a scalar state read by a coefficient
            if any(symbol in coeff.free_symbols for _, coeff in assign.value.terms):
                add(name, vjp_scalar(assign.value, adjoint, symbol))
        # A scalar input read by a coefficient (a ridge fixed per head: h_reg = lambda I + H); not the query scale.
        for symbol in sorted({x for _, c in assign.value.terms for x in c.free_symbols if isinstance(x, sp.Symbol)
                              and not isinstance(x, MatrixSymbol) and x not in (K, V) and x.name != "scale"}
                             - set(scalars_of.values()), key=lambda x: x.name):
            add(symbol.name, vjp_scalar(assign.value, adjoint, symbol))
        for leaf in sorted(_leaves(assign.value), key=lambda x: x.name):
            add(leaf.name, vjp(assign.value, adjoint, leaf))
    states = [*leaves_of, *scalars_of]
    return Adjoint(readout={name: found.pop(name) for name in states if name in found},
                   readout_query=found.pop(q.name), steps=steps, readout_intermediates=tuple(computed),
                   readout_inputs=found)


def _leaves(poly: MatPoly) -> set:
    """The matrix and vector symbols a polynomial reads, in its chains and its coefficients' inner products."""
    found = set()
    for chain, coeff in poly.terms:
        for leaf in chain:
            found |= leaf.atoms(MatrixSymbol)
        for inner in coeff.atoms(Inner):
            found |= inner.atoms(MatrixSymbol)
    return found


__all__ = ["OUTPUT_ADJOINT", "Adjoint", "AssignAdjoint", "Frobenius", "RowDot", "derive_adjoint", "pairing", "vjp",
           "vjp_scalar"]
