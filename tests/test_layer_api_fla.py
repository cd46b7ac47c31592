"""The generated GatedDeltaRule layer is a drop-in for fla's GatedDeltaNet layer (flash-linear-attention 0.6.0):
with fla's parameters copied in, the same inputs give the same outputs, in a batch and for a padded batch.

fla's Triton kernels cannot run on a CPU, so its layer runs here with them replaced by what they compute: its
gated delta rule by fla's own reference (`naive_recurrent_gated_delta_rule`, after the gate, the L2 norms and
the sigmoid that its kernel applies), its short convolution and gated RMS norm by their formulas. Everything
else (projections, gate parameters, unpadding, the order of the steps) is fla's code as it ships.
"""

import pytest
import torch
import torch.nn.functional as F

import fla.layers.gated_deltanet as fla_gated_deltanet
from fla.layers import GatedDeltaNet
from fla.modules import FusedRMSNormGated, ShortConvolution
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from generated.gated_delta_rule import GatedDeltaRule


def _fla_rule_on_cpu(q, k, v, g, beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
                     use_beta_sigmoid_in_kernel=False, cu_seqlens=None, use_gate_in_kernel=False, A_log=None,
                     dt_bias=None, **_):
    """What fla's chunk kernel computes for the layer's call, through fla's reference, sequence by sequence."""
    if use_qk_l2norm_in_kernel:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    if use_beta_sigmoid_in_kernel:
        beta = beta.sigmoid()
    if use_gate_in_kernel:
        g = -A_log.float().exp() * F.softplus(g.float() + dt_bias)
    bounds = [0, q.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
    outputs = [naive_recurrent_gated_delta_rule(q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b], g[:, a:b])[0]
               for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outputs, dim=1).to(v.dtype), None


def _short_convolution(self, x, cache=None, output_final_state=False, cu_seqlens=None, **_):
    """fla's ShortConvolution (a depthwise causal nn.Conv1d, then SiLU), sequence by sequence."""
    bounds = [0, x.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
    W = self.kernel_size[0]
    parts = [F.conv1d(x[:, a:b].transpose(1, 2), self.weight, self.bias, padding=W - 1, groups=x.shape[-1])
             [..., :b - a].transpose(1, 2) for a, b in zip(bounds[:-1], bounds[1:])]
    return F.silu(torch.cat(parts, dim=1)), None


def _causal_conv1d(x, weight, bias=None, activation=None, **_):
    """fla's fused causal_conv1d for q, k and v at once (weight [C, W]): the same convolution, then SiLU."""
    W = weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=W - 1, groups=x.shape[-1])[..., :x.shape[1]]
    return F.silu(y.transpose(1, 2)), None


def _gated_norm(self, x, g, *_, **__):
    """fla's FusedRMSNormGated with the swish gate: RMSNorm(x) * weight * silu(g)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps) * self.weight
    return (normed * F.silu(g.float())).to(x.dtype)


@pytest.fixture
def fla_on_cpu(monkeypatch):
    monkeypatch.setattr(fla_gated_deltanet, "chunk_gated_delta_rule", _fla_rule_on_cpu)
    monkeypatch.setattr(ShortConvolution, "forward", _short_convolution)
    monkeypatch.setattr(fla_gated_deltanet, "causal_conv1d", _causal_conv1d)
    monkeypatch.setattr(FusedRMSNormGated, "forward", _gated_norm)


def _pair(D=64, H=2, K=16):
    """fla's layer and ours with the same configuration and parameters (ours named by our convention)."""
    torch.manual_seed(0)
    theirs = GatedDeltaNet(hidden_size=D, head_dim=K, num_heads=H, expand_v=1, use_short_conv=True, conv_size=4,
                           use_gate=True, layer_idx=0).float()
    ours = GatedDeltaRule(hidden_size=D, num_heads=H, head_dim=K, layer_idx=0, use_short_conv=True, conv_size=4,
                          use_output_gate=True).float()
    copies = {"q_proj.weight": "q_proj.weight", "k_proj.weight": "k_proj.weight", "v_proj.weight": "v_proj.weight",
              "g_proj.weight": "a_proj.weight", "g_A_log": "A_log", "g_dt_bias": "dt_bias",
              "beta_proj.weight": "b_proj.weight", "output_gate_proj.weight": "g_proj.weight",
              "o_norm.weight": "o_norm.weight", "o_proj.weight": "o_proj.weight"}
    state = dict(theirs.named_parameters())
    with torch.no_grad():
        for mine, their_name in copies.items():
            dict(ours.named_parameters())[mine].copy_(state[their_name])
        ours.beta_proj.bias.zero_()  # fla's beta projection has no bias
        for name in ("q", "k", "v"):
            getattr(ours, f"{name}_conv1d").weight.copy_(getattr(theirs, f"{name}_conv1d").weight.squeeze(1))
    return theirs, ours


def test_same_outputs_as_fla_gated_deltanet(fla_on_cpu):
    theirs, ours = _pair()
    x = torch.randn(2, 23, 64)
    with torch.enable_grad():  # fla picks its chunk mode while gradients are recorded
        o_theirs, _, _ = theirs(x)
    o_ours, _, _ = ours(x)
    torch.testing.assert_close(o_ours, o_theirs, atol=2e-5, rtol=2e-4)


def test_same_outputs_as_fla_with_padding(fla_on_cpu):
    theirs, ours = _pair()
    x = torch.randn(2, 15, 64)
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[1, 11:] = 0  # right padding
    with torch.enable_grad():
        o_theirs, _, _ = theirs(x, attention_mask=mask)
    o_ours, _, _ = ours(x, attention_mask=mask)
    kept = mask.bool()
    torch.testing.assert_close(o_ours[kept], o_theirs[kept], atol=2e-5, rtol=2e-4)
