"""Layers that are not in the catalogue: write a spec, generate, import, check against the oracle."""

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
from typer.testing import CliRunner

from generated.titans_linear import naive_titans_linear
from ttr_codegen.cli import app
from ttr_codegen.spec import load_spec
from ttr_codegen.testing import LayerChecks, OnlineChecks

NEW_SPECS = {
    "normalised_linear_attention": """
name: normalised_linear_attention
description: Linear attention with the key-sum normaliser of the original formulation.
regressor: linear
weights: uniform
optimiser: gradient_step_from_zero
readout: {scale: default, normalise: sum}
""",
    "key_gated_delta_rule": """
name: key_gated_delta_rule
description: Decay every key channel on its own, then one online gradient step.
inputs:
  g: {shape: [B, T, H, K], role: log_decay}
  beta: {shape: [B, T, H], role: step_size}
regressor: linear
weights: {decay: g}
optimiser: {method: online_gradient_step, step_size: beta}
""",
    "weighted_ridge": """
name: weighted_ridge
description: Exact ridge regression with a fixed per-head decay and a scalar ridge.
inputs:
  g_gamma: {shape: [H], role: log_decay}
  ridge: {shape: [H], role: ridge}
regressor: linear
weights: {decay: g_gamma}
optimiser: {method: exact, ridge: ridge}
""",
}

# Nonlinear memories beyond the catalogue: a deeper network with per-sample rates and weight decay, and a
# linear memory (one layer, no bias) trained by momentum in mini-batches of one token, which is Titans'
# linear memory by another derivation.
NEW_ONLINE_SPECS = {
    # Its input names swap the generated code's own (rate, forget) and reuse a fast weight's (b).
    "deep_silu_memory": """
name: deep_silu_memory
description: A three-layer SiLU memory with biases and a layer norm, decayed SGD in mini-batches of 8.
inputs:
  forget: {shape: [B, T, H], role: step_size}
  rate: {shape: [B, T, H], role: forget}
  w: {shape: [H, K], role: norm_weight}
  b: {shape: [H, K], role: norm_bias}
regressor: {class: mlp, depth: 3, hidden: 2, activation: silu, bias: true, layer_norm: {weight: w, bias: b}}
optimiser: {method: minibatch_gd, batch_size: 8, step_size: forget, weight_decay: rate}
""",
    "momentum_linear_memory": """
name: momentum_linear_memory
description: A linear memory trained by momentum SGD with weight decay, one token per mini-batch.
inputs:
  theta: {shape: [B, T, H], role: step_size}
  alpha: {shape: [B, T, H], role: forget}
  eta: {shape: [B, T, H], role: momentum}
regressor: {class: mlp, depth: 1}
optimiser: {method: minibatch_gd, batch_size: 1, step_size: theta, momentum: eta, weight_decay: alpha}
""",
}


@pytest.fixture(scope="module")
def generated_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    specs = NEW_SPECS | NEW_ONLINE_SPECS
    for name, text in specs.items():
        (root / f"{name}.yaml").write_text(text)
    result = CliRunner().invoke(app, ["generate", *[str(root / f"{n}.yaml") for n in specs],
                                      "--out", str(root / "newlayers")])
    assert result.exit_code == 0, result.output
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


@pytest.mark.parametrize("name", sorted(NEW_SPECS))
def test_new_layer_matches_its_oracle(generated_root, name):
    module = importlib.import_module(f"newlayers.{name}")
    camel = load_spec(generated_root / f"{name}.yaml").camel_name
    checks = LayerChecks(generated_root / f"{name}.yaml", getattr(module, f"naive_{name}"), getattr(module, camel))
    checks.matches_oracle(63, 16, 12)
    checks.state_carry()
    checks.gradients_match_oracle()
    checks.layer()


def test_normalised_linear_attention_equals_the_field(generated_root):
    module = importlib.import_module("newlayers.normalised_linear_attention")
    g = torch.Generator().manual_seed(0)
    # positive feature maps, as normalised linear attention is used with
    q, k = (F.elu(torch.randn(2, 30, 2, 8, generator=g)) + 1 for _ in range(2))
    v = torch.randn(2, 30, 2, 6, generator=g)
    o, _ = module.naive_normalised_linear_attention(q, k, v)
    o_ref, _ = naive_recurrent_linear_attn(q, k, v, normalize=True)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(NEW_ONLINE_SPECS))
def test_new_nonlinear_memory_matches_its_oracle(generated_root, name):
    module = importlib.import_module(f"newlayers.{name}")
    camel = load_spec(generated_root / f"{name}.yaml").camel_name
    checks = OnlineChecks(generated_root / f"{name}.yaml", getattr(module, f"naive_{name}"),
                          getattr(module, f"chunk_{name}"), getattr(module, camel))
    for op in ("naive", "chunk"):
        checks.matches_oracle(op, 21, 8)
    for op in ("naive", "chunk"):
        checks.split_matches_oracle(op)
    checks.packed_sequences()
    checks.gradients_match_oracle()
    checks.layer_trains()


def test_momentum_in_mini_batches_of_one_is_titans_linear(generated_root):
    """Two derivations of one layer: the mlp path (derived gradient of a one-layer network, mini-batches of
    one token) and the linear family's (titans_linear: momentum on S with weight decay) give the same outputs
    and final state and momentum."""
    module = importlib.import_module("newlayers.momentum_linear_memory")
    generator = torch.Generator().manual_seed(0)
    B, T, H, K, V = 2, 30, 2, 8, 8
    q, k, v = (torch.randn(B, T, H, D, generator=generator, dtype=torch.float64) for D in (K, K, V))
    k = F.normalize(k, dim=-1)
    theta, alpha, eta = (torch.rand(B, T, H, generator=generator, dtype=torch.float64) * c for c in (0.5, 0.2, 1.0))
    S0, Z0 = (0.1 * torch.randn(B, H, K, V, generator=generator, dtype=torch.float64) for _ in range(2))
    o, (W, S_W) = module.chunk_momentum_linear_memory(q, k, v, theta, alpha, eta, initial_state=(S0, Z0),
                                                      output_final_state=True)
    o_ref, (S, Z) = naive_titans_linear(q, k, v, theta, alpha, eta, initial_state=(S0, Z0), output_final_state=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(W, S, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S_W, Z, rtol=1e-10, atol=1e-10)
