"""Regressors beyond the linear memory: affine, local polynomial (query-local weights), kernel ridge.

All three are weighted least-squares problems whose normal equations the derivation solves in closed
form on the canonical form:

- an affine fit m(k) = b + W (k - c) has block normal equations in the weighted moments
  (omega, m_k, h_kk, m_v, h_kv); eliminating b (a Schur complement) leaves a K x K system for W. The
  centre c cancels, which the derivation shows by solving with c = q and c = 0 and comparing.
- local constant regression is the same fit without W (degree 0): o = m_v / omega.
- kernel ridge regression is ridge regression on a feature map Phi, turned into its kernel form by the
  push-through identity Phi (Phi^T Phi + lambda I)^-1 = (Phi Phi^T + lambda I)^-1 Phi.
"""

from __future__ import annotations

import sympy as sp
from sympy import DiagMatrix, Inverse, MatrixSymbol, Transpose

from ..spec import Spec
from .algebra import K, V, MatPoly
from .rule import Assign, StateVar, Structure, UpdateRule

N = sp.Symbol("N", integer=True, positive=True)  # number of keys a query sees
q = MatrixSymbol("q", K, 1)
k = MatrixSymbol("k", K, 1)
v = MatrixSymbol("v", V, 1)
OMEGA = sp.Symbol("omega", positive=True)
M_K, M_V = MatrixSymbol("m_k", K, 1), MatrixSymbol("m_v", V, 1)
H_KK, H_KV = MatrixSymbol("h_kk", K, K), MatrixSymbol("h_kv", K, V)
SIGMA, R_KV, DELTA = MatrixSymbol("sigma", K, K), MatrixSymbol("r_kv", K, V), MatrixSymbol("delta", K, 1)
SYMMETRIC = frozenset({"h_kk", "sigma"})
SCALE = sp.Symbol("scale", positive=True)


def _leaf(x) -> MatPoly:
    return MatPoly.leaf(x, SYMMETRIC)


def affine_fit(centre: MatPoly, omega: sp.Expr, ridge: MatPoly, query: MatPoly) -> tuple[list[Assign], MatPoly]:
    """Solve min_{b, W} sum_i w_i ||v_i - b - W^T-free form (k_i - c)||^2 + ||Lambda^(1/2) W||^2 and return m(query).

    The unknowns are b (V) and W (K x V, rows of the regressor's linear part); the weighted moments are
    omega = sum w, m_k = sum w k, h_kk = sum w k k^T, m_v = sum w v, h_kv = sum w k v^T.
    """
    m_k, h_kk, m_v, h_kv = _leaf(M_K), _leaf(H_KK), _leaf(M_V), _leaf(H_KV)
    # Normal equations in the features phi(k) = [1; k - c]:
    #   [omega  a12^T] [b^T]   [m_v^T]
    #   [a12    A22  ] [W  ] = [r2   ]
    a12 = m_k - centre.scaled(omega)
    a22 = h_kk - m_k @ centre.T() - centre @ m_k.T() + (centre @ centre.T()).scaled(omega) + ridge
    r2 = h_kv - centre @ m_v.T()
    # Eliminate b: the Schur complement of omega.
    sigma = a22 - (a12 @ a12.T()).scaled(1 / omega)
    r_kv = r2 - (a12 @ m_v.T()).scaled(1 / omega)
    # W = sigma^-1 r_kv, b = (m_v - W^T a12) / omega, prediction b + W^T (query - c).
    w_t = _leaf(Transpose(R_KV)) @ _leaf(Inverse(SIGMA))
    prediction = m_v.scaled(1 / omega) - (w_t @ a12).scaled(1 / omega) + w_t @ (query - centre)
    rest, delta = prediction.factor_prefix((Transpose(R_KV), Inverse(SIGMA)))
    output = rest + w_t @ _leaf(DELTA)
    return [Assign("sigma", sigma), Assign("r_kv", r_kv), Assign("delta", delta)], output


def _ridge(spec: Spec) -> MatPoly:
    ridge = spec.optimiser.ridge
    if isinstance(ridge, str) and spec.input(ridge).per_key:
        return MatPoly.leaf(DiagMatrix(MatrixSymbol(ridge, K, 1)))
    value = sp.Float(ridge) if isinstance(ridge, float) else sp.Symbol(ridge, real=True)
    return MatPoly.identity(K, scale=value)


def derive_affine(spec: Spec, weights) -> UpdateRule:
    """The parametric affine memory solved exactly: moments are additive states, the fit is per query."""
    retention, w = weights.retention(), weights.sample
    moments = [
        ("omega", "1", "1", "the total weight sum_i gamma_i w_i", MatPoly.build(1, 1, [((), retention * OMEGA + w)])),
        ("m_k", "K", "1", "the weighted key sum", _leaf(M_K).scaled(retention) + _leaf(k).scaled(w)),
        ("h_kk", "K", "K", "the weighted key second moment", _leaf(H_KK).scaled(retention) + (_leaf(k) @ _leaf(k).T()).scaled(w)),
        ("m_v", "V", "1", "the weighted value sum", _leaf(M_V).scaled(retention) + _leaf(v).scaled(w)),
        ("h_kv", "K", "V", "the weighted key-value moment", _leaf(H_KV).scaled(retention) + (_leaf(k) @ _leaf(v).T()).scaled(w)),
    ]
    query = _leaf(q).scaled(SCALE)
    fit, output = affine_fit(MatPoly.build(K, 1, []), OMEGA, _ridge(spec), query)
    local_fit, local_output = affine_fit(query, OMEGA, _ridge(spec), query)
    same = [a.value for a in fit] == [a.value for a in local_fit] and output == local_output
    return UpdateRule(
        spec.name, tuple(StateVar(n, r, c, meaning) for n, r, c, meaning, _ in moments),
        tuple(Assign(n, value) for n, _, _, _, value in moments), 1, tuple(fit) + (Assign("o", output),),
        Structure.SECOND_ORDER, "five additive moment states and a K x K solve per query (affine fit)",
        objective_text=f"m_t = argmin_(W, b) 1/2 sum_(i<=t) gamma_i^(t) ||v_i - W^T k_i - b||^2 + 1/2 ||Lambda^(1/2) W||_F^2, "
                       f"Lambda = {spec.optimiser.ridge}; {weights.text}; o_t = m_t(scale q_t)",
        objective_latex=r"m_t = \arg\min_{W,b} \tfrac12\sum_{i\le t}\gamma_i^{(t)}\lVert v_i - W^\top k_i - b\rVert^2"
                        r" + \tfrac12\lVert\Lambda^{1/2}W\rVert_F^2",
        equivalences=(("the fit is the same with the features centred at the query (k - q): a local-linear "
                       "regression with these weights" if same else "centring changes the fit"),
                      "sigma = h_kk - m_k m_k^T / omega + Lambda is omega times the weighted key covariance plus the ridge"),
        vectors=weights.vectors, scale=spec.readout.scale)


def log_weight(spec: Spec) -> tuple[MatPoly, list[str]]:
    """log s(k, q) of the query-local kernel, in canonical form, and what each of its terms means."""
    if spec.weights.kernel == "exp_dot":
        log_s = (_leaf(k).T() @ _leaf(q)).scaled(SCALE)
    else:
        difference = _leaf(q) - _leaf(k)
        log_s = (difference.T() @ difference).scaled(-SCALE / 2)
    notes = []
    expression = log_s.scalar()
    for term in sp.Add.make_args(sp.expand(expression)):
        names = {m.name for m in term.atoms(MatrixSymbol)}
        if names == {"q"}:
            notes.append(f"{term}: depends on the query alone, cancels in the normalisation")
        elif names == {"k"}:
            notes.append(f"{term}: depends on the key alone; constant only when all keys have the same norm, "
                         "otherwise a key of large norm gets weight regardless of its distance to the query")
        else:
            notes.append(f"{term}: softmax attention's exp(scale q.k) kernel")
    return log_s, notes


def derive_local_polynomial(spec: Spec) -> UpdateRule:
    degree = spec.regressor.degree
    log_s, notes = log_weight(spec)
    weights_text = f"s_i = exp({log_s.scalar()})"
    if spec.weights.decay:
        weights_text += f" * prod_(j=i+1..t) exp({spec.weights.decay}_j)"
    if spec.weights.sample_weight:
        weights_text += f" * {spec.weights.sample_weight}_i"
    if spec.weights.window:
        weights_text += f", zero for i <= t - {spec.weights.window}"
    scale = spec.readout.scale
    if scale is None and spec.weights.kernel == "gaussian":
        scale = 1.0 / spec.weights.bandwidth
    if degree == 0:
        readout: tuple[Assign, ...] = (Assign("o", _leaf(M_V)),)
        structure, detail = Structure.LOCAL_CONSTANT, "normalised weights; o = m_v (the weighted value mean)"
    elif degree == 1:
        fit, output = affine_fit(_leaf(q), sp.Integer(1), _ridge(spec), _leaf(q))
        readout = tuple(fit) + (Assign("o", output),)
        structure, detail = Structure.LOCAL_LINEAR, "normalised weights; weighted moments and a K x K solve per query"
        if spec.optimiser.solver == "cg":
            detail += (f" (sigma x = delta by {spec.optimiser.solver_iterations} conjugate-gradient steps from x = 0, "
                       "exact after K steps in exact arithmetic)")
    else:
        readout = ()
        structure, detail = Structure.LOCAL_POLYNOMIAL, ("normalised weights; the weighted normal equations of the "
                                                 "degree-2 monomials of (k - q), solved per query")
    equivalences = list(notes)
    if degree == 1:
        equivalences.append("o = m_v - C_vk (C_kk + lambda I)^-1 (m_k - q): softmax attention's output minus a "
                            "correction through the weighted key covariance")
    return UpdateRule(
        spec.name, (), (), 1, readout, structure, detail,
        objective_text=(f"o_t = m(q_t), m = argmin over polynomials of degree {degree} in (k - q_t) of "
                        f"1/2 sum_(i<=t) w_i ||v_i - m(k_i)||^2" + (f" + {spec.optimiser.ridge}/2 ||non-constant coefficients||^2"
                                                                    if degree else "")
                        + f"; w_i = s_i / sum_j s_j, {weights_text}"),
        objective_latex=(r"o_t = \hat m(q_t),\ \hat m = \arg\min_{\deg m \le " + str(degree) +
                         r"} \tfrac12\sum_{i\le t} w_i \lVert v_i - m(k_i)\rVert^2"),
        equivalences=tuple(equivalences), scale=scale)


def derive_kernel_ridge(spec: Spec) -> UpdateRule:
    """Ridge regression on features Phi [N x F], moved to kernel form by the push-through identity."""
    F = sp.Symbol("F", integer=True, positive=True)
    phi, values, phi_q = MatrixSymbol("Phi", N, F), MatrixSymbol("Y", N, V), MatrixSymbol("phi_q", F, 1)
    gram_f, gram_n = MatrixSymbol("G_F", F, F), MatrixSymbol("G_N", N, N)
    lam = sp.Float(spec.optimiser.ridge)
    # primal: W = (Phi^T Phi + lambda I)^-1 Phi^T Y, o = W^T phi(q) = Y^T Phi G_F^-1 phi(q)
    primal = MatPoly.leaf(Transpose(values)) @ MatPoly.leaf(phi) @ MatPoly.leaf(Inverse(gram_f)) @ MatPoly.leaf(phi_q)
    dual = primal.rewrite_pair((phi, Inverse(gram_f)), (Inverse(gram_n), phi))
    kernel, kappa = MatrixSymbol("kern", N, N), MatrixSymbol("kappa", N, 1)
    dual = dual.rewrite_pair((phi, phi_q), (kappa,))
    gram = MatPoly.leaf(kernel) + MatPoly.identity(N, scale=lam)  # G_N = Phi Phi^T + lambda I
    g_n_leaf = MatrixSymbol("gram", N, N)
    dual = dual.substitute(Inverse(gram_n), MatPoly.leaf(Inverse(g_n_leaf)))
    h = spec.regressor.bandwidth
    scale = spec.readout.scale if spec.readout.scale is not None else (1.0 / h if h else None)
    kernel_text = "exp(-scale ||a - b||^2 / 2)" if spec.regressor.kernel == "gaussian" else "exp(scale a.b)"
    return UpdateRule(
        spec.name, (), (), 1, (Assign("gram", gram), Assign("o", dual)), Structure.KERNEL_RIDGE,
        f"an N x N kernel solve per query over its N = t + 1 keys, kernel kappa(a, b) = {kernel_text}",
        objective_text=(f"o_t = f(q_t), f = argmin_(f in RKHS) 1/2 sum_(i<=t) ||v_i - f(k_i)||^2 + {lam}/2 ||f||^2, "
                        f"kernel {kernel_text}"),
        objective_latex=r"o_t = \hat f(q_t),\ \hat f = \arg\min_f \tfrac12\sum_{i\le t}\lVert v_i - f(k_i)\rVert^2"
                        r" + \tfrac{\lambda}{2}\lVert f\rVert_{\mathcal H}^2",
        equivalences=(f"primal {primal} = dual {dual} by the push-through identity "
                      "Phi (Phi^T Phi + lambda I)^-1 = (Phi Phi^T + lambda I)^-1 Phi",),
        scale=scale)


__all__ = ["N", "affine_fit", "derive_affine", "derive_kernel_ridge", "derive_local_polynomial", "log_weight"]
