"""The generated ttt_linear (specs/ttt_linear.yaml) against fla-core's reference TTT-Linear
(`chunk_ttt_linear_ref`, which computes in float32): outputs, final state and final bias, with its layer
norm parameters, per-token learning rate eta, initial state and bias."""

import pytest
import torch

from generated.ttt_linear import chunk_ttt_linear, naive_ttt_linear
from generated.ttt_linear.naive import loss_gradients

chunk_ttt_linear_ref = pytest.importorskip("fla.ops.ttt.naive").chunk_ttt_linear_ref


@pytest.mark.parametrize("op", [chunk_ttt_linear, naive_ttt_linear], ids=["chunk", "naive"])
@pytest.mark.parametrize("T", [32, 45])
def test_ttt_linear_matches_fla_reference(op, T):
    """Two full mini-batches of 16, and three ending on a part one."""
    B, H, D, eps = 2, 2, 8, 1e-6
    generator = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, T, H, D, generator=generator, dtype=torch.float64) for _ in range(3))
    eta = torch.rand(B, T, H, generator=generator, dtype=torch.float64) * 0.1
    ln_weight = 1 + 0.1 * torch.randn(H, D, generator=generator, dtype=torch.float64)
    ln_bias = 0.1 * torch.randn(H, D, generator=generator, dtype=torch.float64)
    h0 = 0.1 * torch.randn(B, H, D, D, generator=generator, dtype=torch.float64)
    b0 = 0.1 * torch.randn(B, H, 1, D, generator=generator, dtype=torch.float64)

    o, (h, b, h_start, b_start, *_) = op(q, k, v, ln_weight, ln_bias, eta, initial_state=(h0, b0), output_final_state=True)
    o_ref, h_ref, b_ref = chunk_ttt_linear_ref(
        q.float().clone(), k.float(), v.float(), ln_weight.float(), ln_bias.float(), eta[..., None].float(), eps=eps,
        mini_batch_size=16, initial_state=h0.float(), initial_state_bias=b0.float(), output_final_state=True)
    torch.testing.assert_close(o.float(), o_ref, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(h.float(), h_ref, rtol=2e-4, atol=2e-4)
    padding = -T % 16
    if padding:
        # fla pads a part mini-batch with zero keys and values, whose rows move the bias too (their key
        # rows are zero, so the state stays as ours): its final bias is ours plus those rows' step, taken
        # at the last mini-batch's start weights (our final state carries them) with the last token's eta.
        zeros = q.new_zeros(B, H, padding, D)
        _, d_b = loss_gradients(zeros, zeros, h_start, b_start, ln_weight[None, :, None], ln_bias[None, :, None])
        b = b - eta[:, -1, :, None, None] * d_b
    torch.testing.assert_close(b.float(), b_ref, rtol=2e-4, atol=2e-4)
