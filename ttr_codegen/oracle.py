"""The numerical oracle: solve a spec's *stated* regression problem, independently of the derivation.

Nothing here uses a derived update formula. Gradient steps take autograd gradients of the loss; the
implicit step minimises its proximal objective by conjugate gradients on autograd Hessian-vector
products; exact and recursive least squares solve the weighted ridge problem with `torch.linalg.lstsq`
on an explicit design matrix. Everything runs in float64 and is differentiable, so gradients of the
generated code can be compared with gradients through the oracle.
"""

from __future__ import annotations

import torch

from .spec import Spec


# Roles fixed per head by nature; a per-head value of any other role (a decay [H]) acts on every token.
_FIXED_ROLES = ("ridge", "norm_weight", "norm_bias")


def per_token_inputs(spec: Spec, inputs: dict, B: int, T: int) -> dict:
    """The inputs with every per-head value of a per-token role repeated over (B, T): the oracle then indexes
    each token alike."""
    return {name: x if spec.input(name).per_token or spec.input(name).role in _FIXED_ROLES else x.expand(B, T, *x.shape)
            for name, x in inputs.items()}


def _retention(spec: Spec, name: str, inputs: dict) -> torch.Tensor:
    """The factor of the memory kept per token: exp(g) for a log-decay, 1 - alpha for a forget input."""
    x = inputs[name]  # per token (see per_token_inputs)
    return x.exp() if spec.input(name).role == "log_decay" else 1 - x


def _loss(memory: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """1/2 ||memory^T key - value||^2 summed over the batch: memory [..., K, V], key [..., K], value [..., V]."""
    prediction = (memory * key.unsqueeze(-1)).sum(-2)
    return 0.5 * ((prediction - value) ** 2).sum()


def _grad(f, x: torch.Tensor) -> torch.Tensor:
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    return g


def _decay(memory: torch.Tensor, retention: torch.Tensor | None) -> torch.Tensor:
    if retention is None:
        return memory
    return memory * (retention[..., None] if retention.dim() == memory.dim() - 1 else retention[..., None, None])


def memories(spec: Spec, q, k, v, inputs: dict) -> list[torch.Tensor]:
    """The memory S_t [B, H, K, V] after every token t, solving the spec's problem from scratch."""
    method = spec.optimiser.method
    B, T, H, K = q.shape
    Vd = v.shape[-1]
    n = spec.optimiser.steps_per_token
    decay = _retention(spec, spec.weights.decay, inputs) if spec.weights.decay else None
    weight = inputs[spec.weights.sample_weight] if spec.weights.sample_weight else None
    out = []

    if method == "gradient_step_from_zero":
        # S_t = -grad L_t(0), L_t(S) = sum_{i<=t} 1/2 gamma_i^(t) w_i ||S^T k_i - v_i||^2; a per-key decay
        # decays the key coordinates instead of weighting the sample.
        for t in range(T):
            keys, values = k[:, :t + 1], v[:, :t + 1]
            sample = weight[:, :t + 1] if weight is not None else keys.new_ones(B, t + 1, H)
            if decay is not None:
                kept = _kept(decay, t)
                if kept.dim() == keys.dim():
                    keys = keys * kept
                else:
                    sample = sample * kept
            zero = q.new_zeros(B, H, K, Vd)
            out.append(-_grad(lambda S: _weighted_sum_loss(S, keys, values, sample), zero))
        return out

    if method in ("online_gradient_step", "implicit_step", "momentum"):
        S = q.new_zeros(B, H, K, Vd)
        Z = q.new_zeros(B, H, K, Vd)
        for t in range(T):
            X = _decay(S, decay[:, t] if decay is not None else None)
            for j in range(n if method == "online_gradient_step" else 1):
                row = t * n + j
                key, value = k[:, row], v[:, row]
                if method == "online_gradient_step":
                    beta = inputs[spec.optimiser.step_size][:, row]
                    # a step per key channel preconditions the gradient's rows: Diag(beta) grad
                    beta = beta[..., None] if spec.input(spec.optimiser.step_size).per_key else beta[..., None, None]
                    wd = spec.optimiser.weight_decay
                    lam = (1 - _retention(spec, wd, inputs)[:, t][..., None, None]) / beta if wd else 0.0

                    def objective(M, key=key, value=value, lam=lam):
                        return _loss(M, key, value) + (0.5 * lam * M * M).sum()
                    X = X - beta * _grad(objective, X)
                elif method == "implicit_step":
                    beta = inputs[spec.optimiser.step_size][:, t][..., None, None]
                    X = _proximal_step(X, key, value, beta)
                else:
                    theta = inputs[spec.optimiser.step_size][:, t][..., None, None]
                    eta = inputs[spec.optimiser.momentum][:, t][..., None, None]
                    rho = (_retention(spec, spec.optimiser.weight_decay, inputs)[:, t][..., None, None]
                           if spec.optimiser.weight_decay else 1.0)
                    Z = eta * Z - theta * _grad(lambda M, key=key, value=value: _loss(M, key, value), S)
                    X = rho * S + Z
            S = X
            out.append(S)
        return out

    if method in ("exact", "recursive_least_squares"):
        for t in range(T):
            out.append(_ridge_solution(spec, k[:, :t + 1], v[:, :t + 1], inputs, decay, t))
        return out
    raise NotImplementedError(method)


def _kept(retention: torch.Tensor, t: int) -> torch.Tensor:
    """prod_{j=i+1..t} retention_j for every i <= t: [B, t+1, H(, K)]."""
    logs = torch.cumsum(retention[:, :t + 1].log(), dim=1)
    return torch.exp(logs[:, t:t + 1] - logs)


def _weighted_sum_loss(S, keys, values, sample) -> torch.Tensor:
    """sum_i 1/2 sample_i ||S^T k_i - v_i||^2 with keys [B, n, H, K], values [B, n, H, V], S [B, H, K, V]."""
    prediction = torch.einsum("bhkv,bnhk->bnhv", S, keys)
    return 0.5 * (sample[..., None] * (prediction - values) ** 2).sum()


def _proximal_step(X: torch.Tensor, key, value, beta, tolerance: float = 1e-14, max_iterations: int = 64):
    """argmin_Y 1/2 ||Y - X||^2 + beta/2 ||Y^T k - v||^2 by conjugate gradients, one system per (b, h)."""

    def objective(Y):
        prediction = (Y * key.unsqueeze(-1)).sum(-2)
        return (0.5 * ((Y - X) ** 2).sum(dim=(-2, -1)) + 0.5 * beta[..., 0, 0] * ((prediction - value) ** 2).sum(-1)).sum()

    def hessian_times(Y0, p):
        g = _grad(objective, Y0)
        (hp,) = torch.autograd.grad((g * p).sum(), Y0, create_graph=True)
        return hp

    Y = X.detach().clone().requires_grad_(True) if not X.requires_grad else X
    Y0 = torch.zeros_like(X).requires_grad_(True)
    residual = -_grad(objective, Y)
    direction = residual
    rr = (residual * residual).sum(dim=(-2, -1), keepdim=True)
    for _ in range(max_iterations):
        if rr.max() <= tolerance**2:
            break
        hp = hessian_times(Y0, direction)
        step = rr / (direction * hp).sum(dim=(-2, -1), keepdim=True).clamp_min(1e-300)
        Y = Y + step * direction
        residual = residual - step * hp
        rr_new = (residual * residual).sum(dim=(-2, -1), keepdim=True)
        direction = residual + (rr_new / rr.clamp_min(1e-300)) * direction
        rr = rr_new
    return Y


def _ridge_solution(spec: Spec, keys, values, inputs, decay, t) -> torch.Tensor:
    """argmin_S 1/2 sum_i gamma_i w_i ||S^T k_i - v_i||^2 + 1/2 ||Lambda^(1/2) S||^2 by least squares."""
    B, _, H, K = keys.shape
    gamma = _sample_weights(spec, inputs, B, H, t, keys)
    ridge = spec.optimiser.ridge
    if spec.optimiser.method == "recursive_least_squares":
        prior = decay[:, :t + 1].prod(dim=1) if decay is not None else keys.new_ones(B, H)
        lam = ridge * prior[..., None].expand(B, H, K)
    elif isinstance(ridge, str):
        lam = inputs[ridge]
        lam = (lam[..., None].expand(H, K) if lam.dim() == 1 else lam).expand(B, H, K)
    else:
        lam = keys.new_full((B, H, K), ridge)
    root = gamma.sqrt()[..., None]
    design = torch.cat([(root * keys).transpose(1, 2), torch.diag_embed(lam.sqrt())], dim=-2)
    target = torch.cat([(root * values).transpose(1, 2), values.new_zeros(B, H, K, values.shape[-1])], dim=-2)
    return torch.linalg.lstsq(design, target).solution


def default_scale(spec: Spec, K: int) -> float:
    if spec.readout.scale is not None:
        return spec.readout.scale
    bandwidth = spec.weights.bandwidth or spec.regressor.bandwidth
    if (spec.weights.kernel or spec.regressor.kernel) == "gaussian":
        return 1.0 / bandwidth
    return K ** -0.5


def solve(spec: Spec, q, k, v, inputs: dict, scale: float | None = None):
    """Outputs [B, T, H, V] and the final memory of the spec's regression problem.

    The memory is S [B, H, K, V] for linear regressors, the fitted (b; W) [B, H, 1 + K, V] for the affine
    one, and the data (k, v[, decay]) itself for nonparametric regressors, which keep every pair.
    """
    B, T, _, K = q.shape
    inputs = per_token_inputs(spec, inputs, B, T)
    if scale is None:
        scale = default_scale(spec, K)
    if spec.regressor.cls == "local_polynomial":
        return _local_polynomial(spec, q, k, v, inputs, scale)
    if spec.regressor.cls == "kernel_ridge":
        return _kernel_ridge(spec, q, k, v, scale)
    if spec.regressor.cls == "affine":
        return _affine(spec, q, k, v, inputs, scale)
    history = memories(spec, q, k, v, inputs)
    if spec.optimiser.solver == "cg":  # the memory is still the ridge solution; each query's solve is the spec's
        return _ridge_by_cg(spec, q, k, v, inputs, scale), (history[-1] if history else None)
    outputs = []
    for t, S in enumerate(history):
        query = scale * q[:, t]
        o = (S * query.unsqueeze(-1)).sum(-2)
        if spec.readout.normalise == "sum":
            ones = v.new_ones(*v.shape[:-1], 1)
            z = memories(spec, q[:, :t + 1], k[:, :t + 1], ones[:, :t + 1], inputs)[-1]
            o = o / (z * query.unsqueeze(-1)).sum(-2)
        outputs.append(o)
    return torch.stack(outputs, dim=1), (history[-1] if history else None)


def _sample_weights(spec: Spec, inputs: dict, B: int, H: int, t: int, like: torch.Tensor) -> torch.Tensor:
    """gamma_i^(t) w_i for i <= t: [B, t + 1, H], the weights of the samples query t's regression sees."""
    decay = _retention(spec, spec.weights.decay, inputs) if spec.weights.decay else None
    gamma = _kept(decay, t) if decay is not None else like.new_ones(B, t + 1, H)
    if spec.weights.sample_weight:
        gamma = gamma * inputs[spec.weights.sample_weight][:, :t + 1]
    return gamma


def _ridge_by_cg(spec: Spec, q, k, v, inputs, scale):
    """The ridge solution read out as the spec's solver says: o_t = h_kv^T x with (h_kk + Lambda) x = scale q_t
    solved by n conjugate-gradient steps from x = 0 (`_solve_by_cg`), where h_kk = sum_i gamma_i w_i k_i k_i^T
    and h_kv = sum_i gamma_i w_i k_i v_i^T are the normal equations' moments, summed from the samples."""
    B, T, H, K = q.shape
    lam = _ridge_vector(spec, inputs, H, K, q)
    outputs = []
    for t in range(T):
        gamma = _sample_weights(spec, inputs, B, H, t, q)
        keys, values = k[:, :t + 1], v[:, :t + 1]
        h_kk = torch.einsum("bnh,bnhk,bnhl->bhkl", gamma, keys, keys) + torch.diag_embed(lam)
        h_kv = torch.einsum("bnh,bnhk,bnhv->bhkv", gamma, keys, values)
        x = _solve_by_cg(h_kk, scale * q[:, t], spec.optimiser.solver_iterations)
        outputs.append(torch.einsum("bhkv,bhk->bhv", h_kv, x))
    return torch.stack(outputs, dim=1)


def _ridge_vector(spec: Spec, inputs: dict, H: int, K: int, like: torch.Tensor) -> torch.Tensor:
    ridge = spec.optimiser.ridge
    if isinstance(ridge, str):
        lam = inputs[ridge]
        return lam[..., None].expand(H, K) if lam.dim() == 1 else lam
    return like.new_full((H, K), ridge)


def _lstsq_with_ridge(design, target, ridge_rows):
    """min ||design theta - target||^2 + ||ridge_rows theta||^2, batched over [B, H]."""
    design = torch.cat([design, ridge_rows.expand(*design.shape[:-2], *ridge_rows.shape[-2:])], dim=-2)
    target = torch.cat([target, target.new_zeros(*target.shape[:-2], ridge_rows.shape[-2], target.shape[-1])], dim=-2)
    return torch.linalg.lstsq(design, target).solution


def _polynomial_features(d: torch.Tensor, degree: int) -> torch.Tensor:
    """The monomials of the offsets d [..., K] up to `degree`: 1, d_a, d_a d_b (a <= b)."""
    features = [torch.ones_like(d[..., :1])]
    if degree >= 1:
        features.append(d)
    if degree >= 2:
        a, b = torch.triu_indices(d.shape[-1], d.shape[-1])
        features.append(d[..., a] * d[..., b])
    return torch.cat(features, dim=-1)


def _local_polynomial(spec: Spec, q, k, v, inputs, scale):
    """Each query: weighted least squares of a polynomial in (k - q) over the keys it sees; output its intercept."""
    B, T, H, K = q.shape
    degree, window = spec.regressor.degree, spec.weights.window
    log_decay = torch.cumsum(inputs[spec.weights.decay], dim=1) if spec.weights.decay else None
    outputs = []
    for t in range(T):
        first = max(0, t + 1 - window) if window else 0
        keys, values, query = k[:, first:t + 1], v[:, first:t + 1], q[:, t:t + 1]
        if spec.weights.kernel == "exp_dot":
            log_s = scale * (keys * query).sum(-1)
        else:
            log_s = -0.5 * scale * ((keys - query) ** 2).sum(-1)
        if log_decay is not None:
            log_s = log_s + log_decay[:, t:t + 1] - log_decay[:, first:t + 1]
        if spec.weights.sample_weight:  # w_i proportional to s_i times the sample's weight
            log_s = log_s + torch.log(inputs[spec.weights.sample_weight][:, first:t + 1])
        if spec.optimiser.solver == "cg":
            outputs.append(_local_linear_by_cg(spec, inputs, torch.softmax(log_s, dim=1), keys, values, query))
            continue
        root_w = torch.softmax(log_s, dim=1).sqrt().transpose(1, 2)[..., None]  # [B, H, n, 1]
        phi = _polynomial_features((keys - query).transpose(1, 2), degree)  # [B, H, n, F]
        n_features = phi.shape[-1]
        ridge = (spec.optimiser.ridge or 0.0) ** 0.5
        ridge_rows = torch.eye(n_features, dtype=q.dtype)[1:] * ridge  # no penalty on the intercept
        theta = _lstsq_with_ridge(root_w * phi, root_w * values.transpose(1, 2), ridge_rows)
        outputs.append(theta[..., 0, :])
    state = (k, v) + tuple(inputs[name] for name in (spec.weights.decay, spec.weights.sample_weight) if name)
    return torch.stack(outputs, dim=1), state


def _cg_steps(A: torch.Tensor, b: torch.Tensor, iterations: int) -> torch.Tensor:
    """n conjugate-gradient steps on A x = b from x = 0, batched over rows (a row stops once its residual is at
    rounding level). A [..., K, K], b [..., K]."""
    x, residual = torch.zeros_like(b), b
    direction = residual
    size = (residual * residual).sum(-1)
    converged = torch.finfo(residual.dtype).eps ** 2 * size
    for _ in range(iterations):
        stepping = size > converged
        image = torch.einsum("...kl,...l->...k", A, direction)
        curvature = (direction * image).sum(-1)
        stepping = stepping & (curvature > 0)
        step = torch.where(stepping, size / torch.where(stepping, curvature, torch.ones_like(curvature)), 0.0)
        x = x + step[..., None] * direction
        residual = residual - step[..., None] * image
        new_size = (residual * residual).sum(-1)
        turn = torch.where(stepping, new_size / torch.where(stepping, size, torch.ones_like(size)), 0.0)
        direction = residual + turn[..., None] * direction
        size = new_size
    return x


class _AdjointByCG(torch.autograd.Function):
    """Zero in the forward; its backward maps a gradient g to y with A y = g by the spec's n steps. With it,
    x - S(A x - b) (x held constant) has the value x and the implicit gradient of the system's solution,
    dx = A^-1 (db - dA x): how the spec's iterative solvers are differentiated."""

    @staticmethod
    def forward(ctx, A, residual, iterations):
        ctx.save_for_backward(A)
        ctx.iterations = iterations
        return torch.zeros_like(residual)

    @staticmethod
    def backward(ctx, grad):
        (A,) = ctx.saved_tensors
        return None, _cg_steps(A.detach(), grad, ctx.iterations), None


def _solve_by_cg(A: torch.Tensor, b: torch.Tensor, iterations: int) -> torch.Tensor:
    """x from n conjugate-gradient steps on A x = b (A symmetric), differentiated implicitly."""
    with torch.no_grad():
        x = _cg_steps(A, b, iterations)
    return x - _AdjointByCG.apply(A.detach(), torch.einsum("...kl,...l->...k", A, x) - b, iterations)


def _local_linear_by_cg(spec: Spec, inputs, w, keys, values, query):
    """A local-linear fit whose normal equations are solved as the spec says: the slope's system
    (C + Lambda) x = q - k_bar, C the weighted key covariance and Lambda the ridge, by n conjugate-gradient
    steps from x = 0, differentiated implicitly (`_solve_by_cg`); the fit's value at the query is
    v_bar + sum_i w_i ((k_i - k_bar) . x) (v_i - v_bar). w [B, n, H]; keys, values [B, n, H, D]; query
    [B, 1, H, K]; returns [B, H, V]."""
    B, _, H, K = keys.shape
    w, keys, values = w.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)  # [B, H, n, ...]
    total = w.sum(-1, keepdim=True)  # 1 for a local fit's normalised weights
    k_bar, v_bar = torch.einsum("bhn,bhnk->bhk", w, keys) / total, torch.einsum("bhn,bhnv->bhv", w, values) / total
    centred = keys - k_bar[:, :, None]
    covariance = torch.einsum("bhn,bhnk,bhnl->bhkl", w, centred, centred) + torch.diag_embed(
        _ridge_vector(spec, inputs, H, K, keys))
    x = _solve_by_cg(covariance, query[:, 0] - k_bar, spec.optimiser.solver_iterations)
    coefficients = w * torch.einsum("bhnk,bhk->bhn", centred, x)
    return v_bar + torch.einsum("bhn,bhnv->bhv", coefficients, values - v_bar[:, :, None])


def _kernel_ridge(spec: Spec, q, k, v, scale):
    """Kernel ridge regression over the prefix, minimised over f = sum_i alpha_i kappa(k_i, .) in the RKHS:
    ||Y - Kern alpha||^2 + lambda alpha^T Kern alpha, with Kern = L L^T, as least squares."""
    B, T, H, K = q.shape

    def kernel(a, b):
        if spec.regressor.kernel == "gaussian":
            return torch.exp(-0.5 * scale * ((a - b) ** 2).sum(-1))
        return torch.exp(scale * (a * b).sum(-1))

    outputs = []
    for t in range(T):
        keys = k[:, :t + 1].transpose(1, 2)  # [B, H, n, K]
        values = v[:, :t + 1].transpose(1, 2)
        gram = kernel(keys[..., :, None, :], keys[..., None, :, :])
        lower = torch.linalg.cholesky(gram)
        penalty = (spec.optimiser.ridge ** 0.5) * lower.transpose(-1, -2)
        alpha = _lstsq_with_ridge(gram, values, penalty)
        kappa = kernel(keys, q[:, t].unsqueeze(-2))  # [B, H, n]
        outputs.append((kappa.unsqueeze(-1) * alpha).sum(-2))
    return torch.stack(outputs, dim=1), (k, v)


def _affine(spec: Spec, q, k, v, inputs, scale):
    """m_t = argmin_(b, W) sum_i gamma_i w_i ||v_i - W^T k_i - b||^2 + ||Lambda^(1/2) W||^2; o_t = m_t(scale q_t)."""
    B, T, H, K = q.shape
    lam = _ridge_vector(spec, inputs, H, K, q)  # [H, K]
    ridge_rows = torch.cat([q.new_zeros(H, K, 1), torch.diag_embed(lam.sqrt())], dim=-1)  # [H, K, 1 + K]
    outputs, theta = [], None
    for t in range(T):
        gamma = _sample_weights(spec, inputs, B, H, t, q)
        root = gamma.sqrt().transpose(1, 2)[..., None]
        keys = k[:, :t + 1].transpose(1, 2)
        phi = torch.cat([torch.ones_like(keys[..., :1]), keys], dim=-1)
        theta = _lstsq_with_ridge(root * phi, root * v[:, :t + 1].transpose(1, 2), ridge_rows)  # the memory
        if spec.optimiser.solver == "cg":  # the fit's slope system solved as the spec says; its value at the query
            outputs.append(_local_linear_by_cg(spec, inputs, gamma, k[:, :t + 1], v[:, :t + 1], scale * q[:, t:t + 1]))
            continue
        query = torch.cat([q.new_ones(B, H, 1), scale * q[:, t]], dim=-1)
        outputs.append((query.unsqueeze(-1) * theta).sum(-2))
    return torch.stack(outputs, dim=1), theta


def memory_of_state(spec: Spec, state, inputs: dict):
    """What a generated op's state stands for, in the oracle's terms (see `solve`)."""
    if spec.regressor.nonparametric:
        return state
    if spec.regressor.cls == "affine":
        omega, m_k, h_kk, m_v, h_kv = state
        H, K = h_kk.shape[1], h_kk.shape[-1]
        lam = _ridge_vector(spec, inputs, H, K, h_kk)
        sigma = h_kk - m_k[..., :, None] * m_k[..., None, :] / omega[..., None, None] + torch.diag_embed(lam)
        r_kv = h_kv - m_k[..., :, None] * m_v[..., None, :] / omega[..., None, None]
        W = torch.linalg.solve(sigma, r_kv)
        b = (m_v - (W * m_k[..., :, None]).sum(-2)) / omega[..., None]
        return torch.cat([b[..., None, :], W], dim=-2)
    method = spec.optimiser.method
    if method == "exact":
        H_stat, G_stat = state
        K = H_stat.shape[-1]
        ridge = spec.optimiser.ridge
        if isinstance(ridge, str):
            lam = inputs[ridge]
            lam = lam[..., None].expand(lam.shape[0], K) if lam.dim() == 1 else lam
        else:
            lam = H_stat.new_full((H_stat.shape[1], K), ridge)
        return torch.linalg.solve(H_stat + torch.diag_embed(lam), G_stat)
    if isinstance(state, tuple):
        return state[0]
    return state


# --- nonlinear memories (regressor class `mlp`) -------------------------------------------------------


def _mlp_layers(spec: Spec) -> list[str]:
    """The layers' suffixes: W (and b) for one layer, W1, W2, ... for several."""
    return [""] if spec.regressor.depth == 1 else [str(i + 1) for i in range(spec.regressor.depth)]


def mlp_weight_names(spec: Spec) -> list[str]:
    """The fast weights of an `mlp` regressor, in state order: W (, b) for depth 1, W1 (, b1), W2 (, b2), ..."""
    return [name for s in _mlp_layers(spec) for name in ([f"W{s}", f"b{s}"] if spec.regressor.bias else [f"W{s}"])]


def mlp_memory(spec: Spec, x: torch.Tensor, weights: dict, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(g(x), the last layer's output) of the spec's network, written with torch's own functions; x and the
    weights carry leading (B, H) axes, the layer norm's weight and bias are [H, D]."""
    r = spec.regressor
    activation = {"gelu_tanh": lambda h: torch.nn.functional.gelu(h, approximate="tanh"),
                  "silu": torch.nn.functional.silu}.get(r.activation)
    suffixes = _mlp_layers(spec)
    h = x
    for i, s in enumerate(suffixes):
        h = h @ weights[f"W{s}"] + (weights[f"b{s}"] if r.bias else 0)
        if i + 1 < len(suffixes):
            h = activation(h)
    if r.norm_weight is None:
        return h, h
    per_head = lambda name: inputs[name][None, :, None, :]  # noqa: E731  [H, D] -> [1, H, 1, D]
    normed = torch.nn.functional.layer_norm(h, (h.shape[-1],), eps=1e-6)
    return normed * per_head(r.norm_weight) + per_head(r.norm_bias), h


def online_state_names(spec: Spec) -> list[str]:
    """The parts of a nonlinear memory's state, in order: the fast weights, their momenta (with momentum), and,
    when a mini-batch holds several tokens, what a call that ends inside one must carry to the next: the
    weights its gradients are taken at (<weight>_start), the sum of its gradients so far (G_<weight>, when each
    row's rate scales that sum), and `position`, the tokens of it already seen (0 at a mini-batch's start,
    where the carried parts are the weights and zeros)."""
    opt = spec.optimiser
    names = mlp_weight_names(spec)
    parts = names + [f"S_{n}" for n in names if opt.momentum]
    if opt.batch_size > 1:
        parts += [f"{n}_start" for n in names] + [f"G_{n}" for n in names if opt.step_size_per == "row"]
        parts.append("position")
    return parts


def solve_online(spec: Spec, q, k, v, inputs: dict, initial_state, scale: float | None = None):
    """Outputs [B, T, H, V] and the final state (see `online_state_names`) of a nonlinear memory, run as
    stated: token by token, each token's loss 1/2 ||g(k_t) - target_t||^2 differentiated by autograd at the
    weights of its mini-batch's start (create_graph, so the result is differentiable), the optimiser's step
    written out, and the network read at the scaled query with the token's weights. initial_state is the
    whole state, or only the weights (and momenta): then every sequence is at a mini-batch's start."""
    opt, r = spec.optimiser, spec.regressor
    B, T, H, K = q.shape
    inputs = per_token_inputs(spec, inputs, B, T)
    scale = default_scale(spec, K) if scale is None else scale
    names = mlp_weight_names(spec)
    row_rates = opt.step_size_per == "row"
    parts = list(initial_state)
    weights = {n: parts.pop(0) for n in names}
    momenta = {n: (parts.pop(0) if parts else torch.zeros_like(weights[n])) for n in names} if opt.momentum else {}
    if parts:  # a state carried from a call that may have ended inside a mini-batch
        start = {n: parts.pop(0) for n in names}
        gradient_sum = {n: parts.pop(0) for n in names} if row_rates else {}
        position = parts.pop(0)
    else:
        start = dict(weights)
        gradient_sum = {n: torch.zeros_like(w) for n, w in weights.items()}
        position = torch.zeros(B, dtype=torch.int64, device=q.device)
    per_token = lambda name, t: inputs[name][:, t, :, None, None]  # noqa: E731  [B, H, 1, 1]
    outputs = []
    for t in range(T):
        # Sequences whose mini-batch starts at this token take its gradients at their weights now.
        begins = ((position + t) % opt.batch_size == 0)[:, None, None, None]
        for n in names:
            start[n] = torch.where(begins, weights[n], start[n])
            if not start[n].requires_grad:
                start[n] = start[n].detach().requires_grad_(True)
            if row_rates:
                gradient_sum[n] = torch.where(begins, 0, gradient_sum[n])
        x = k[:, t, :, None, :]  # [B, H, 1, K]
        target = v[:, t, :, None, :] - (x if r.residual else 0)
        fitted, _ = mlp_memory(spec, x, start, inputs)
        loss = 0.5 * ((fitted - target) ** 2).sum()  # a sum over (B, H): each slice's gradient is its own
        grads = dict(zip(names, torch.autograd.grad(loss, [start[n] for n in names], create_graph=True)))
        rate = per_token(opt.step_size, t)
        retain = 1 - per_token(opt.weight_decay, t) if opt.weight_decay else 1
        for n in names:
            if row_rates:
                gradient_sum[n] = gradient_sum[n] + grads[n]
                weights[n] = start[n] - rate * gradient_sum[n]
            elif opt.momentum:
                momenta[n] = per_token(opt.momentum, t) * momenta[n] - rate * grads[n]
                weights[n] = retain * weights[n] + momenta[n]
            else:
                weights[n] = retain * weights[n] - rate * grads[n]
        query = scale * q[:, t, :, None, :]
        g, last = mlp_memory(spec, query, weights, inputs)
        read = {"pre_norm": last + g, "input": query + g if r.residual else g}[spec.readout.residual]
        outputs.append(read[:, :, 0])
    final = [weights[n] for n in names] + [momenta[n] for n in names if opt.momentum]
    if opt.batch_size > 1:
        # At a mini-batch's end the state is as at the next one's start: its weights, and no gradients yet.
        position = (position + T) % opt.batch_size
        done = (position == 0)[:, None, None, None]
        final += [torch.where(done, weights[n], start[n]) for n in names]
        final += [torch.where(done, 0, gradient_sum[n]) for n in names if row_rates]
        final.append(position)
    o = torch.stack(outputs, dim=1) if T else v.new_zeros(B, 0, H, v.shape[-1])
    return o, tuple(final)
