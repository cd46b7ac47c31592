"""Stage 2: from the three design choices to a per-token update rule, symbolically.

Each optimiser is a function that builds the objective it minimises (as SymPy traces), differentiates
it, applies its step or solves its stationarity condition, and returns the update in canonical form.
Classification then reads the structure off the transition of the main state.
"""

from __future__ import annotations

import sympy as sp
from sympy import DiagMatrix, Inverse, MatrixSymbol, Trace, Transpose

from ..spec import Spec
from .algebra import K, V, MatPoly, scaled_text, sherman_morrison, trace_gradient
from .rule import Assign, StateVar, Structure, UpdateRule


class DerivationError(Exception):
    """A combination of choices the derivation cannot handle; carries the spec field to blame."""

    def __init__(self, field: str, message: str, hint: str):
        super().__init__(message)
        self.field, self.message, self.hint = field, message, hint


# The symbols of one token's update.
S = MatrixSymbol("S", K, V)
q = MatrixSymbol("q", K, 1)
k = MatrixSymbol("k", K, 1)
v = MatrixSymbol("v", V, 1)
X = MatrixSymbol("X", K, V)  # the point a step is taken from
Y = MatrixSymbol("Y", K, V)  # the unknown of an implicit step
SYMMETRIC = frozenset({"h_kk", "P", "h_reg"})
SCALE = sp.Symbol("scale", positive=True)


def scalar(name: str) -> sp.Symbol:
    return sp.Symbol(name, real=True)


def sample_loss(point) -> list:
    """The per-sample loss 1/2 ||m(k) - v||^2 with m(k) = point^T k, as weighted traces."""
    residual = point.T * k - v
    return [(sp.Rational(1, 2), Trace(residual.T * residual))]


class _Weights:
    """The regression weights as an operator D on the memory: gamma_i^(t) = c_t gamma_i^(t-1)."""

    def __init__(self, spec: Spec):
        self.vectors: tuple[tuple[str, str], ...] = ()
        self.sample = scalar(spec.weights.sample_weight) if spec.weights.sample_weight else sp.Integer(1)
        decay = spec.weights.decay
        if decay is None:
            self.kind, self.operator = "uniform", MatPoly.identity(K)
        elif spec.input(decay).per_key:
            leaf = MatrixSymbol(f"exp_{decay}", K, 1)
            self.vectors = ((leaf.name, decay),)
            self.kind, self.operator = "per-key decay", MatPoly.leaf(DiagMatrix(leaf))
        else:
            kind = "fixed per-head decay" if not spec.input(decay).per_token else "data-dependent decay"
            self.kind, self.operator = kind, MatPoly.identity(K, scale=sp.exp(scalar(decay)))
        self.text = {
            "uniform": "gamma_i^(t) = 1",
            "fixed per-head decay": f"gamma_i^(t) = exp({decay})^(t-i)",
            "data-dependent decay": f"gamma_i^(t) = prod_(j=i+1..t) exp({decay}_j)",
            "per-key decay": f"key channels decayed by prod_(j=i+1..t) exp({decay}_j)",
        }[self.kind] + (f", times the sample weight {spec.weights.sample_weight}_i" if spec.weights.sample_weight else "")

    def retention(self) -> sp.Expr:
        """The scalar retention factor (only for scalar decays)."""
        return self.operator.coefficient(())


def _retention_of(spec: Spec, name: str) -> sp.Expr:
    """The factor a weight-decay input keeps of the memory per token."""
    return sp.exp(scalar(name)) if spec.input(name).role == "log_decay" else 1 - scalar(name)


def _readout(spec: Spec, state=S) -> MatPoly:
    return MatPoly.leaf(Transpose(state)) @ MatPoly.leaf(q).scaled(_scale(spec))


def _scale(spec: Spec) -> sp.Expr:
    # The query scale stays a symbol: the generated op takes `scale`, with the spec's value as default.
    return SCALE


def derive(spec: Spec) -> UpdateRule:
    from .nonparametric import derive_affine, derive_kernel_ridge, derive_local_polynomial

    if spec.regressor.cls == "local_polynomial":
        return derive_local_polynomial(spec)
    if spec.regressor.cls == "kernel_ridge":
        return derive_kernel_ridge(spec)
    weights = _Weights(spec)
    if spec.regressor.cls == "affine":
        return derive_affine(spec, weights)
    method = spec.optimiser.method
    builder = {
        "gradient_step_from_zero": _gradient_step_from_zero,
        "online_gradient_step": _online_gradient_step,
        "implicit_step": _implicit_step,
        "momentum": _momentum,
        "exact": _exact,
        "recursive_least_squares": _recursive_least_squares,
    }[method]
    return builder(spec, weights)


# ---------------------------------------------------------------------------------------------
# Optimisers
# ---------------------------------------------------------------------------------------------


def _gradient_step_from_zero(spec: Spec, weights: _Weights) -> UpdateRule:
    # S_t = -grad L_t(0) with L_t = sum_i gamma_i^(t) l_i; the weights factor over time, so
    # S_t = D_t S_{t-1} - w_t grad l_t(0).
    gradient = trace_gradient(sample_loss(S), S)
    write = -gradient.substitute(S, MatPoly.build(K, V, []))
    new_s = weights.operator @ MatPoly.leaf(S) + write.scaled(weights.sample)
    states = [StateVar("S", "K", "V", "the memory: o = S^T (scale q)")]
    update = [Assign("S", new_s)]
    readout = _readout(spec)
    if spec.readout.normalise == "sum":
        z = MatrixSymbol("z", K, 1)
        states.append(StateVar("z", "K", "1", "the weighted key sum (normaliser)"))
        update.append(Assign("z", weights.operator @ MatPoly.leaf(z) + MatPoly.leaf(k).scaled(weights.sample)))
        readout = readout.scaled(1 / (MatPoly.leaf(Transpose(z)) @ MatPoly.leaf(q).scaled(_scale(spec))).scalar())
    structure, detail, equivalences = _classify(new_s)
    return UpdateRule(
        spec.name, tuple(states), tuple(update), 1, (Assign("o", readout),), structure, detail,
        objective_text=f"S_t = S - grad L_t(S) at S = 0, L_t(S) = 1/2 sum_(i<=t) gamma_i^(t) ||S^T k_i - v_i||^2;"
                       f" {weights.text}",
        objective_latex=r"S_t = -\nabla_S \tfrac12 \sum_{i\le t} \gamma_i^{(t)} \lVert S^\top k_i - v_i\rVert^2 \big|_{S=0}",
        equivalences=tuple(equivalences), vectors=weights.vectors, scale=spec.readout.scale)


def _online_gradient_step(spec: Spec, weights: _Weights) -> UpdateRule:
    # Decay first (the weights), then S_t = X - beta * grad(l_t + lambda/2 ||X||^2)(X) at X = D S_{t-1}.
    beta = scalar(spec.optimiser.step_size)
    objective = sample_loss(X)
    text = f"one gradient step of size {spec.optimiser.step_size} on 1/2 ||X^T k_t - v_t||^2"
    latex = r"S_t = X - \beta_t \nabla_X \big(\tfrac12 \lVert X^\top k_t - v_t\rVert^2"
    wd = spec.optimiser.weight_decay
    if wd:
        lam = sp.Symbol("lambda_wd", positive=True)
        objective = objective + [(lam / 2, Trace(X.T * X))]
        text += f" + lambda/2 ||X||^2 with beta*lambda = {sp.simplify(1 - _retention_of(spec, wd))}"
        latex += r" + \tfrac{\lambda_t}{2}\lVert X\rVert_F^2"
    if spec.input(spec.optimiser.step_size).per_key:
        # A step per key channel: a diagonal preconditioner, X - Diag(beta) grad (no weight decay: the spec
        # check refuses it).
        preconditioner = MatPoly.leaf(DiagMatrix(MatrixSymbol(spec.optimiser.step_size, K, 1)))
        step = MatPoly.leaf(X) - preconditioner @ trace_gradient(objective, X)
        text = text.replace(f"of size {spec.optimiser.step_size}", f"preconditioned by Diag({spec.optimiser.step_size})")
        latex = latex.replace(r"\beta_t \nabla_X", r"\mathrm{Diag}(\beta_t) \nabla_X")
    else:
        step = MatPoly.leaf(X) - trace_gradient(objective, X).scaled(beta)
    if wd:
        step = step.subs_scalar({sp.Symbol("lambda_wd", positive=True): (1 - _retention_of(spec, wd)) / beta})
    new_s = step.substitute(X, weights.operator @ MatPoly.leaf(S))
    structure, detail, equivalences = _classify(new_s)
    n = spec.optimiser.steps_per_token
    if n > 1:
        # Only products of delta steps have a structure class of their own (and a chunked form); a product of
        # other steps keeps its step's class.
        detail = f"a product of {n} {structure} steps per token ({detail})"
        structure = Structure.DELTA_PRODUCT if structure == Structure.DELTA else structure
    return UpdateRule(
        spec.name, (StateVar("S", "K", "V", "the memory: o = S^T (scale q)"),), (Assign("S", new_s),), n,
        (Assign("o", _readout(spec)),), structure, detail,
        objective_text=f"X = D_t S_(t-1) ({weights.text}); S_t = {text}" + (f", {n} times per token" if n > 1 else ""),
        objective_latex=latex + r"\big),\quad X = D_t S_{t-1}",
        equivalences=tuple(equivalences), vectors=weights.vectors, scale=spec.readout.scale)


def _implicit_step(spec: Spec, weights: _Weights) -> UpdateRule:
    # S_t = argmin_Y 1/2 ||Y - X||^2 + beta/2 ||Y^T k - v||^2: solve the (linear) stationarity condition.
    beta = scalar(spec.optimiser.step_size)
    distance = Y - X
    objective = [(sp.Rational(1, 2), Trace(distance.T * distance))] + [
        (beta * c, t) for c, t in sample_loss(Y)]
    a, b = trace_gradient(objective, Y).split_on(Y)  # a @ Y + b = 0
    inverse = _invert_identity_plus_rank_one(a, "optimiser.step_size")
    solution = (inverse @ (-b)).substitute(X, weights.operator @ MatPoly.leaf(S))
    structure, detail, equivalences = _classify(solution)
    return UpdateRule(
        spec.name, (StateVar("S", "K", "V", "the memory: o = S^T (scale q)"),), (Assign("S", solution),), 1,
        (Assign("o", _readout(spec)),), structure, detail,
        objective_text=f"S_t = argmin_Y 1/2 ||Y - X||_F^2 + {beta}/2 ||Y^T k_t - v_t||^2, X = D_t S_(t-1) ({weights.text})",
        objective_latex=r"S_t = \arg\min_Y \tfrac12\lVert Y - X\rVert_F^2 + \tfrac{\beta_t}{2}\lVert Y^\top k_t - v_t\rVert^2",
        equivalences=tuple(equivalences), vectors=weights.vectors, scale=spec.readout.scale)


def _momentum(spec: Spec, weights: _Weights) -> UpdateRule:
    # Z_t = eta Z_{t-1} - theta grad l_t(S_{t-1});  S_t = rho S_{t-1} + Z_t.
    theta, eta = scalar(spec.optimiser.step_size), scalar(spec.optimiser.momentum)
    rho = _retention_of(spec, spec.optimiser.weight_decay) if spec.optimiser.weight_decay else sp.Integer(1)
    Z = MatrixSymbol("Z", K, V)
    new_z = MatPoly.leaf(Z).scaled(eta) - trace_gradient(sample_loss(S), S).scaled(theta)
    new_s = MatPoly.leaf(S).scaled(rho) + MatPoly.leaf(Z)
    stacked_s = new_s.substitute(Z, new_z)
    a_ss, rest = stacked_s.split_on(S)
    a_sz, _ = rest.split_on(Z)
    _, _, equivalences = _classify(stacked_s.substitute(Z, MatPoly.build(K, V, [])))
    detail = (f"stacked affine on (S, Z): S_t = ({a_ss}) S_(t-1) + ({a_sz}) Z_(t-1) + write; "
              f"Z_t = {new_z}")
    return UpdateRule(
        spec.name,
        (StateVar("S", "K", "V", "the memory: o = S^T (scale q)"), StateVar("Z", "K", "V", "the momentum")),
        (Assign("Z", new_z), Assign("S", new_s)), 1, (Assign("o", _readout(spec)),), Structure.STACKED_AFFINE, detail,
        objective_text=f"Z_t = {scaled_text(eta, 'Z_(t-1)')} - {scaled_text(theta, 'grad l_t(S_(t-1))')}; "
                       f"S_t = {scaled_text(rho, 'S_(t-1)')} + Z_t, "
                       "l_t(S) = 1/2 ||S^T k_t - v_t||^2",
        objective_latex=r"Z_t = \eta_t Z_{t-1} - \theta_t \nabla \ell_t(S_{t-1}),\quad S_t = \rho_t S_{t-1} + Z_t",
        equivalences=tuple(f"with momentum {eta} = 0: {e}" for e in equivalences),
        vectors=weights.vectors, scale=spec.readout.scale)


def _exact(spec: Spec, weights: _Weights) -> UpdateRule:
    # grad L_t(S) + Lambda S = 0 with grad l_i(S) = A_i S + b_i gives (H_t + Lambda) S = G_t, where
    # H_t = D H_{t-1} + w A_t and G_t = D G_{t-1} - w b_t; the read-out solves per query.
    a, b = trace_gradient(sample_loss(S), S).split_on(S)
    H, G = MatrixSymbol("h_kk", K, K), MatrixSymbol("h_kv", K, V)
    retention = weights.retention()
    new_h = MatPoly.leaf(H).scaled(retention) + a.scaled(weights.sample)
    new_g = MatPoly.leaf(G).scaled(retention) - b.scaled(weights.sample)
    ridge = spec.optimiser.ridge
    if isinstance(ridge, str) and spec.input(ridge).per_key:
        lam = MatPoly.leaf(DiagMatrix(MatrixSymbol(ridge, K, 1)))
    else:
        lam = MatPoly.identity(K, scale=sp.Float(ridge) if isinstance(ridge, float) else scalar(ridge))
    h_reg = MatrixSymbol("h_reg", K, K)
    readout = (MatPoly.leaf(Transpose(G)) @ MatPoly.leaf(Inverse(h_reg), SYMMETRIC)
               @ MatPoly.leaf(q).scaled(_scale(spec)))
    return UpdateRule(
        spec.name,
        (StateVar("h_kk", "K", "K", "the weighted key second moment sum_i gamma_i w_i k_i k_i^T"),
         StateVar("h_kv", "K", "V", "the weighted key-value moment sum_i gamma_i w_i k_i v_i^T")),
        (Assign("h_kk", new_h), Assign("h_kv", new_g)), 1,
        (Assign("h_reg", MatPoly.leaf(H, SYMMETRIC) + lam), Assign("o", readout)),
        Structure.SECOND_ORDER, "two additive states (h_kk, h_kv) and a K x K solve per query",
        objective_text=f"S_t = argmin_S 1/2 sum_(i<=t) gamma_i^(t) ||S^T k_i - v_i||^2 + 1/2 ||Lambda^(1/2) S||_F^2, "
                       f"Lambda = {ridge}; {weights.text}",
        objective_latex=r"S_t = \arg\min_S \tfrac12 \sum_{i\le t}\gamma_i^{(t)}\lVert S^\top k_i - v_i\rVert^2"
                        r" + \tfrac12\lVert \Lambda^{1/2} S\rVert_F^2",
        equivalences=(f"o_t = S_t^T q_t with S_t = (h_kk + Lambda)^-1 h_kv: {readout}",),
        vectors=weights.vectors, scale=spec.readout.scale)


def _recursive_least_squares(spec: Spec, weights: _Weights) -> UpdateRule:
    # The exact solution with the prior decayed like the data: H_t = rho H_{t-1} + k k^T, H_0 = lambda I,
    # P = H^-1 by Sherman-Morrison, and S_t = P_t G_t rewritten with rho H_{t-1} = P_t^-1 - k k^T.
    rho = weights.retention()
    P = MatrixSymbol("P", K, K)
    p_leaf = MatPoly.leaf(P, SYMMETRIC)
    new_p = sherman_morrison(p_leaf.scaled(1 / rho), k, k, 1)
    p_new = MatrixSymbol("P_new", K, K)
    kk = MatPoly.leaf(k) @ MatPoly.leaf(Transpose(k))
    g_t = (MatPoly.leaf(Inverse(p_new)) - kk) @ MatPoly.leaf(S) + MatPoly.leaf(k) @ MatPoly.leaf(Transpose(v))
    new_s = (MatPoly.leaf(p_new) @ g_t).substitute(p_new, new_p)
    structure_detail = "a K x K inverse-covariance state P and the memory S; the gain P k / (rho + k^T P k)"
    return UpdateRule(
        spec.name,
        (StateVar("S", "K", "V", "the memory: o = S^T (scale q)"),
         StateVar("P", "K", "K", "the inverse weighted key covariance", init="identity_over_ridge")),
        (Assign("S", new_s), Assign("P", new_p)), 1, (Assign("o", _readout(spec)),),
        Structure.SECOND_ORDER, structure_detail,
        objective_text=f"S_t = argmin_S 1/2 sum_(i<=t) gamma_i^(t) ||S^T k_i - v_i||^2 + lambda/2 gamma_0^(t) ||S||_F^2, "
                       f"lambda = {spec.optimiser.ridge}; {weights.text}",
        objective_latex=r"S_t = \arg\min_S \tfrac12 \sum_{i\le t}\gamma_i^{(t)}\lVert S^\top k_i - v_i\rVert^2"
                        r" + \tfrac{\lambda}{2}\gamma_0^{(t)}\lVert S\rVert_F^2",
        equivalences=("equals the exact ridge solution with the prior lambda*I decayed like the data "
                      "(derived here with Sherman-Morrison; checked numerically by the oracle tests)",),
        vectors=weights.vectors, scale=spec.readout.scale)


def _invert_identity_plus_rank_one(a: MatPoly, field: str) -> MatPoly:
    chains = set(a.chains())
    rank_one = [c for c in chains if len(c) == 2]
    if not chains <= {()} | set(rank_one) or len(rank_one) > 1 or () not in chains:
        raise DerivationError(field, f"the implicit step's system matrix {a} is not identity plus rank one",
                              "use a regressor and loss whose Hessian is c I + s u w^T")
    inverse = MatPoly.identity(K, scale=1 / a.coefficient(()))
    if not rank_one:
        return inverse
    u, w_t = rank_one[0]
    return sherman_morrison(inverse, u, w_t.T if isinstance(w_t, Transpose) else w_t, a.coefficient(rank_one[0]))


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


def _classify(update: MatPoly) -> tuple[Structure, str, list[str]]:
    """Read the structure of S_t = A S_{t-1} + B off the canonical form."""
    a, b = update.split_on(S)
    chains = set(a.chains())
    kk = (k, Transpose(k))
    equivalences: list[str] = []
    if chains == {()}:
        return Structure.ADDITIVE, f"S_t = {scaled_text(a.coefficient(()), 'S_(t-1)')} + {b}", equivalences
    if len(chains) == 1 and isinstance(next(iter(chains))[0], DiagMatrix) and len(next(iter(chains))) == 1:
        return Structure.DIAGONAL, f"S_t = {a} S_(t-1) + {b}", equivalences
    if chains == {(), kk}:
        decay, rank_one = a.coefficient(()), -a.coefficient(kk)
        write = b.coefficient((k, Transpose(v)))
        if set(b.chains()) == {(k, Transpose(v))}:
            step = sp.factor(rank_one / decay)
            values = sp.factor(write * decay / rank_one)
            if values == 1:
                if decay == 1:
                    equivalences.append(f"the delta rule (DeltaNet) with step beta -> {step}")
                else:
                    equivalences.append(f"decay-then-step (Gated DeltaNet form) with decay {decay} and step {step}")
            else:
                equivalences.append(f"decay-then-step (Gated DeltaNet form) with decay {decay}, step beta' = {step} "
                                    f"and values v' = ({values}) v")
        return Structure.DELTA, f"S_t = ({a}) S_(t-1) + {b}", equivalences
    diag = [c for c in chains if len(c) == 1 and isinstance(c[0], DiagMatrix)]
    # A step preconditioned per key channel: the rank-one term starts with Diag(beta).
    preconditioned = any(len(c) >= 3 and isinstance(c[0], DiagMatrix) for c in chains)
    if preconditioned:
        equivalences.append("a step per key channel (Gated DeltaNet-2's erase gate b on the key b * k with the step "
                            "1 / b; RWKV-7's transition: docs/fla_layers.md)")
    elif diag and len(chains) == 2:
        equivalences.append("Kimi Delta Attention (KDA): a per-key decay, then a delta step")
    if diag and len(chains) == 2:
        return Structure.DIAGONAL_PLUS_RANK_ONE, f"S_t = ({a}) S_(t-1) + {b}", equivalences
    # A step preconditioned per key channel without a decay: I - (beta * k) k^T, the identity as the diagonal.
    if len(chains) == 2 and () in chains and preconditioned:
        return Structure.DIAGONAL_PLUS_RANK_ONE, f"S_t = ({a}) S_(t-1) + {b}", equivalences
    return Structure.AFFINE, f"S_t = ({a}) S_(t-1) + {b}", equivalences
