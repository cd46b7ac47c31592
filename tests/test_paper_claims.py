"""The paper's claims, checked with generated layers (numbers are in docs/claims.md)."""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from generated.gaussian_kernel_attention import naive_gaussian_kernel_attention
from generated.softmax_attention import naive_softmax_attention
from ttr_codegen.cli import app

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from recall import K, recall_error  # noqa: E402

H_BANDWIDTH = 8.0  # the bandwidth in specs/gaussian_kernel_attention.yaml


def qkv(normalise_keys: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 50, 2, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 50, 2, 16, generator=g, dtype=torch.float64) * 3
    v = torch.randn(2, 50, 2, 8, generator=g, dtype=torch.float64)
    return q, (F.normalize(k, dim=-1) if normalise_keys else k), v


def test_gaussian_kernel_equals_softmax_with_normalised_keys():
    q, k, v = qkv(normalise_keys=True)
    gaussian, _ = naive_gaussian_kernel_attention(q, k, v)  # default scale 1 / h
    softmax, _ = naive_softmax_attention(q, k, v, scale=1 / H_BANDWIDTH)
    torch.testing.assert_close(gaussian, softmax, rtol=1e-12, atol=1e-12)


def test_gaussian_kernel_differs_from_softmax_with_unnormalised_keys():
    q, k, v = qkv(normalise_keys=False)
    gaussian, _ = naive_gaussian_kernel_attention(q, k, v)
    softmax, _ = naive_softmax_attention(q, k, v, scale=1 / H_BANDWIDTH)
    assert (gaussian - softmax).abs().max() > 0.1


def test_a_large_norm_key_captures_softmax_weight_regardless_of_distance():
    # Query e1; key 1 equals the query; key 2 is far from it (distance ~ 7) but has a large norm along e1.
    q = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    q[..., 0] = 1.0
    k = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    k[0, 0, 0, 0] = 1.0
    k[0, 1, 0, 0] = 8.0
    v = torch.tensor([[[[1.0]], [[-1.0]]]], dtype=torch.float64)
    softmax, _ = naive_softmax_attention(q, k, v, scale=1.0)
    gaussian, _ = naive_gaussian_kernel_attention(q, k, v, scale=1.0)
    assert softmax[0, 1, 0, 0] < -0.99  # the distant, large key takes the weight
    assert gaussian[0, 1, 0, 0] > 0.99  # the proper local regressor keeps the near key


def test_explain_shows_the_kernel_decomposition():
    result = CliRunner().invoke(app, ["explain", str(ROOT / "specs" / "gaussian_kernel_attention.yaml")])
    assert result.exit_code == 0
    assert "cancels in the normalisation" in result.output
    assert "constant only when all keys have the same norm" in result.output
    assert "softmax attention's exp(scale q.k) kernel" in result.output


def test_exact_least_squares_recalls_every_pair_while_t_at_most_k():
    for kind in ("random", "correlated"):
        for n in (1, 8, K // 2, K - 1):
            assert recall_error("mesa (exact)", n, kind) < 1e-6, (kind, n)
        assert recall_error("mesa (exact)", 2 * K, kind) > 0.1  # more pairs than dimensions


def test_linear_attention_suffers_cross_talk_and_the_delta_rule_sits_between():
    for kind in ("random", "correlated"):
        linear, delta, exact = (recall_error(name, 16, kind) for name in ("linear attention", "DeltaNet",
                                                                          "mesa (exact)"))
        assert linear > delta > exact, (kind, linear, delta, exact)
    assert recall_error("linear attention", 16, "correlated") > 10 * recall_error("linear attention", 16, "random")
    # cross-talk grows with the number of stored pairs
    assert recall_error("linear attention", 4, "random") < recall_error("linear attention", 32, "random")
