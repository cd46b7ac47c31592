"""Conformance with the field: generated references equal fla-core's references for the same layers.

fla's references compute in float32 (whatever the input dtype), so the comparison is in float32.
"""

import pytest
import torch
import torch.nn.functional as F

from fla.ops.delta_rule.naive import delta_rule_recurrence
from fla.ops.gated_delta_product.naive import naive_recurrent_gated_delta_product
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from fla.ops.gdn2.naive import naive_recurrent_gdn2
from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence
from fla.ops.gla.naive import naive_recurrent_gla
from fla.ops.kda.naive import naive_chunk_kda, naive_recurrent_kda
from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
from fla.ops.mesa_net.naive import naive_mesa_net_CG, naive_mesa_net_exact
from fla.ops.precond_gated_delta_rule.naive import naive_recurrent_precond_gated_delta_rule
from fla.ops.precond_kda.naive import naive_recurrent_precond_kda
from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

from generated.delta_product import naive_delta_product
from generated.delta_rule import naive_delta_rule
from generated.gated_delta_product import chunk_gated_delta_product, naive_gated_delta_product
from generated.gated_delta_product.chunk_triton import chunk_gated_delta_product_triton
from generated.gated_delta_rule import naive_gated_delta_rule
from generated.gla import naive_gla
from generated.kda import chunk_kda, naive_kda
from generated.kda.chunk_triton import chunk_kda_triton
from generated.linear_attention import naive_linear_attention
from generated.mesa import naive_mesa
from generated.mesa_cg import chunk_mesa_cg, naive_mesa_cg
from generated.preconditioned_kda import chunk_preconditioned_kda, naive_preconditioned_kda
from generated.simple_gla import naive_simple_gla

B, T, H, K, V = 2, 37, 3, 16, 12
TOL = {"atol": 2e-5, "rtol": 2e-5}


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, K, generator=g)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    gate = F.logsigmoid(torch.randn(B, T, H, generator=g) + 3)
    gate_k = F.logsigmoid(torch.randn(B, T, H, K, generator=g) + 3)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=g))
    state = torch.randn(B, H, K, V, generator=g)
    return q, k, v, gate, gate_k, beta, state


def test_linear_attention(data):
    q, k, v, *_, state = data
    ours = naive_linear_attention(q, k, v, scale=0.3, initial_state=state, output_final_state=True)
    theirs = naive_recurrent_linear_attn(q, k, v, scale=0.3, initial_state=state, output_final_state=True)
    torch.testing.assert_close(ours, theirs, **TOL)


def test_simple_gla(data):
    q, k, v, gate, _, _, state = data
    ours = naive_simple_gla(q, k, v, gate, initial_state=state, output_final_state=True)
    theirs = naive_recurrent_simple_gla(q, k, v, gate, initial_state=state, output_final_state=True)
    torch.testing.assert_close(ours, theirs, **TOL)


def test_gla(data):
    q, k, v, _, gate_k, _, state = data
    ours = naive_gla(q, k, v, gate_k, initial_state=state, output_final_state=True)
    theirs = naive_recurrent_gla(q, k, v, gate_k, initial_state=state, output_final_state=True)
    torch.testing.assert_close(ours, theirs, **TOL)


def test_delta_rule(data):
    q, k, v, _, _, beta, state = data
    ours_o, ours_s = naive_delta_rule(q, k, v, beta, initial_state=state, output_final_state=True)
    # fla's delta-rule reference takes [B, H, T, D] and a fixed K ** -0.5 scale.
    o, s = delta_rule_recurrence(*(x.transpose(1, 2) for x in (q, k, v)), beta.transpose(1, 2),
                                 initial_state=state.clone(), output_final_state=True)
    torch.testing.assert_close((ours_o, ours_s), (o.transpose(1, 2), s), **TOL)


def test_gated_delta_rule(data):
    q, k, v, gate, _, beta, state = data
    ours = naive_gated_delta_rule(q, k, v, gate, beta, scale=0.2, initial_state=state, output_final_state=True)
    theirs = naive_recurrent_gated_delta_rule(q, k, v, beta, gate, scale=0.2, initial_state=state,
                                              output_final_state=True)
    torch.testing.assert_close(ours, theirs, **TOL)


def test_delta_product(data):
    q, _, _, _, _, _, state = data
    g = torch.Generator().manual_seed(1)
    k = F.normalize(torch.randn(B, 2 * T, H, K, generator=g), dim=-1)
    v = torch.randn(B, 2 * T, H, V, generator=g)
    beta = torch.sigmoid(torch.randn(B, 2 * T, H, generator=g))
    ours = naive_delta_product(q, k, v, beta, initial_state=state, output_final_state=True)
    theirs = naive_recurrent_gated_delta_product(q, k, v, None, beta, K ** -0.5, initial_state=state.clone(),
                                                 output_final_state=True, num_householder=2)
    torch.testing.assert_close(ours, theirs, **TOL)


def test_mesa_exact(data):
    q, k, _, gate, _, beta, _ = data
    g = torch.Generator().manual_seed(2)
    v = torch.randn(B, T, H, K, generator=g)  # fla's reference needs V == K
    lamb = 0.5 + torch.rand(H, K, generator=g)
    o, (h_kk, h_kv) = naive_mesa(q, k, v, gate, beta, lamb, output_final_state=True)
    o_ref, h_kk_ref, h_kv_ref = naive_mesa_net_exact(q, k, v, gate, lamb, beta)
    torch.testing.assert_close((o, h_kk, h_kv), (o_ref, h_kk_ref, h_kv_ref), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("op", [naive_mesa_cg, chunk_mesa_cg], ids=["naive", "chunk"])
def test_mesa_cg(data, op):
    """MesaNet as fla computes it: the same 30 conjugate-gradient steps per query from x = 0, from a carried
    state. fla adds 1e-5 to the denominators of its step ratios, which damps its late steps at unit scale (its
    output then stays ~5e-4 from the solution that ours, undamped, reaches to ~1e-6). A solve is linear in its
    right-hand side, so queries scaled by 1e4 make that guard negligible: both then take the same steps.
    fla's chunked reference needs T to be a multiple of its chunk."""
    q, k, _, gate, _, beta, _ = data
    g = torch.Generator().manual_seed(2)
    v = torch.randn(B, T, H, K, generator=g)  # fla's reference needs V == K
    lamb = 0.5 + torch.rand(H, K, generator=g)
    _, (h_kk, h_kv) = naive_mesa(q[:, :5], k[:, :5], v[:, :5], gate[:, :5], beta[:, :5], lamb, output_final_state=True)
    big = 1e4
    inputs = (big * q[:, 1:], k[:, 1:], v[:, 1:], gate[:, 1:], beta[:, 1:])  # 36 tokens: three chunks of 12
    o, (kk, kv) = op(*inputs, lamb, initial_state=(h_kk, h_kv), output_final_state=True)
    o_ref, kk_ref, kv_ref = naive_mesa_net_CG(*inputs[:4], lamb, inputs[4], chunk_size=12, max_CG_iteration=30,
                                              h_kk_init=h_kk, h_kv_init=h_kv)
    torch.testing.assert_close((o / big, kk, kv), (o_ref / big, kk_ref, kv_ref), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("op", [naive_gated_delta_product, chunk_gated_delta_product, chunk_gated_delta_product_triton],
                         ids=["naive", "chunk", "chunk_triton"])
def test_gated_delta_product(data, op):
    """One decay per token (before its first step), two steps per token, against fla's reference."""
    q, _, _, gate, _, _, state = data
    g = torch.Generator().manual_seed(3)
    k = F.normalize(torch.randn(B, 2 * T, H, K, generator=g), dim=-1)
    v = torch.randn(B, 2 * T, H, V, generator=g)
    beta = torch.sigmoid(torch.randn(B, 2 * T, H, generator=g))
    ours = op(q, k, v, gate, beta, scale=0.3, initial_state=state, output_final_state=True)
    theirs = naive_recurrent_gated_delta_product(q, k, v, gate, beta, 0.3, initial_state=state.clone(),
                                                 output_final_state=True, num_householder=2)
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("op", [naive_kda, chunk_kda, chunk_kda_triton], ids=["naive", "chunk", "chunk_triton"])
def test_kda(data, op):
    """KDA: a per-key decay, then a delta step whose error reads the decayed memory; against fla's token
    loop and its chunked reference (which starts from zeros)."""
    q, k, v, _, gate_k, beta, state = data
    ours = op(q, k, v, gate_k, beta, scale=0.3, initial_state=state, output_final_state=True)
    theirs = naive_recurrent_kda(q, k, v, gate_k, beta, scale=0.3, initial_state=state.clone(), output_final_state=True)
    torch.testing.assert_close(ours, theirs, **TOL)
    first = [x[:, :32] for x in (q, k, v, gate_k, beta)]  # fla's chunked reference takes whole chunks only
    o, _ = op(*first, scale=0.3)
    o_chunked, _ = naive_chunk_kda(*first, scale=0.3, chunk_size=16)
    torch.testing.assert_close(o, o_chunked, **TOL)


@pytest.mark.parametrize("op", [naive_preconditioned_kda, chunk_preconditioned_kda], ids=["naive", "chunk"])
def test_gdn2_erase_gate(data, op):
    """Gated DeltaNet-2, S_t = (I - k (b * k)^T) Diag(e^g) S + k (w * v)^T, is KDA with a step per key channel
    (a diagonal preconditioner) on the erase-gated key: our key b * k, step 1 / b and value w * v give
    (a * k') k'^T = k (b * k)^T and (a * k') v'^T = k (w * v)^T, the query unchanged."""
    q, k, v, _, gate_k, _, state = data
    g = torch.Generator().manual_seed(4)
    erase = 0.2 + 0.8 * torch.rand(B, T, H, K, generator=g)  # b in (0.2, 1): 1 / b is the preconditioner
    write = torch.rand(B, T, H, V, generator=g)
    ours = op(q, erase * k, write * v, gate_k, 1 / erase, scale=0.3, initial_state=state, output_final_state=True)
    theirs = naive_recurrent_gdn2(q, k, v, gate_k, erase, write, scale=0.3, initial_state=state.clone(),
                                  output_final_state=True)
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("op", [naive_preconditioned_kda, chunk_preconditioned_kda], ids=["naive", "chunk"])
def test_rwkv7_transition(data, op):
    """RWKV-7's transition (fla's DPLR reference, which its kernels run with a = -kappa, b = kappa * alpha):
    S_t = Diag(e^w) S - (alpha * kappa) kappa^T S + k v^T, the removal reading the state before the decay.
    With the write key k = alpha * kappa (what a preconditioned gradient step writes) it is our layer on the
    key kappa / e^w with the step alpha * e^w: (a * k') (e^w * k')^T = (alpha * kappa) kappa^T. RWKV-7 itself
    writes along a key of its own, which no gradient step on one sample does (docs/fla_layers.md)."""
    q, _, v, _, gate_k, _, state = data
    g = torch.Generator().manual_seed(5)
    kappa = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    alpha = torch.rand(B, T, H, K, generator=g)  # RWKV-7's in-context learning rate, in (0, 1)
    decay = gate_k.exp()
    ours = op(q, kappa / decay, v, gate_k, alpha * decay, scale=K ** -0.5, initial_state=state,
              output_final_state=True)
    head_first = [x.transpose(1, 2) for x in (q, alpha * kappa, v, -kappa, alpha * kappa, gate_k)]
    o, final = dplr_recurrence(*head_first, initial_state=state.clone(), output_final_state=True)  # scale K^-0.5
    torch.testing.assert_close(ours, (o.transpose(1, 2), final), **TOL)


def _adaptive_preconditioner(k, g_atk, beta_atk, x=1.5, eps=1e-6, center=-0.2):
    """fla's precond_kda preconditioner, a function of the keys alone: a decayed running sum of squared keys
    A_t = e^(g_atk) A_(t-1) + beta_atk k_t^2 per channel, mapped to M_t = x^(-s) with s = r / (1 + |r|),
    r = log(A_t + eps) - center (channels seen often get smaller steps)."""
    A, preconditioners = torch.zeros_like(k[:, 0]), []
    for t in range(k.shape[1]):
        A = g_atk[:, t, :, None].exp() * A + beta_atk[:, t, :, None] * k[:, t] ** 2
        r = torch.log(A + eps) - center
        preconditioners.append(torch.pow(torch.tensor(x), -r / (1 + r.abs())))
    return torch.stack(preconditioners, dim=1)


@pytest.mark.parametrize("op", [naive_preconditioned_kda, chunk_preconditioned_kda], ids=["naive", "chunk"])
def test_precond_kda(data, op):
    """fla's precond_kda is KDA whose step is preconditioned per key channel by M_t, computed from the keys
    alone (their running second moment): with the step beta_t * M_t it is our preconditioned_kda."""
    q, k, v, _, gate_k, beta, state = data
    g = torch.Generator().manual_seed(6)
    g_atk = F.logsigmoid(torch.randn(B, T, H, generator=g) + 2)
    beta_atk = torch.rand(B, T, H, generator=g)
    step = beta[..., None] * _adaptive_preconditioner(k, g_atk, beta_atk)
    ours = op(q, k, v, gate_k, step, scale=0.3, initial_state=state, output_final_state=True)
    o, final, _ = naive_recurrent_precond_kda(q, k, v, gate_k, g_atk, beta_atk, beta, scale=0.3,
                                              initial_state=state.clone(), output_final_state=True)
    torch.testing.assert_close(ours, (o, final), **TOL)


def test_precond_gated_delta_rule(data, tmp_path):
    """fla's precond_gated_delta_rule: a scalar decay, then a step preconditioned per key channel by the same
    key-only M_t. The schema writes it as a [B, T, H] decay with a [B, T, H, K] step (not in the catalogue: the
    regression fixture's spec, generated here), naive and chunked."""
    from pathlib import Path

    from ttr_codegen.fuzz import _import_package
    from ttr_codegen.pipeline import compile_spec
    from ttr_codegen.render.writer import plan_changes, write_atomically

    fixture = Path(__file__).parent / "fuzz_regressions" / "preconditioned_scalar_decay.yaml"
    compiled = compile_spec(fixture, tmp_path)
    write_atomically(plan_changes(compiled.package_dir, compiled.files))
    package = _import_package(compiled.package_dir)
    q, k, v, gate, _, beta, state = data
    q = F.normalize(q, dim=-1)  # fla's reference normalises q and k itself (k already is)
    g = torch.Generator().manual_seed(7)
    g_atk = F.logsigmoid(torch.randn(B, T, H, generator=g) + 2)
    beta_atk = torch.rand(B, T, H, generator=g)
    step = beta[..., None] * _adaptive_preconditioner(k, g_atk, beta_atk)
    o, final, _ = naive_recurrent_precond_gated_delta_rule(q, k, v, g_atk, gate, beta_atk, beta, scale=0.3,
                                                            initial_state=state.clone(), output_final_state=True)
    for op in (package.naive_preconditioned_scalar_decay, package.chunk_preconditioned_scalar_decay):
        ours = op(q, k, v, gate, step, scale=0.3, initial_state=state, output_final_state=True)
        torch.testing.assert_close(ours, (o, final), **TOL)
