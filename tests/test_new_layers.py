"""Layers that are not in the catalogue: write a spec, generate, import, check against the oracle."""

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
from typer.testing import CliRunner

from ttr_codegen.cli import app
from ttr_codegen.testing import LayerChecks

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


@pytest.fixture(scope="module")
def generated_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    for name, text in NEW_SPECS.items():
        (root / f"{name}.yaml").write_text(text)
    result = CliRunner().invoke(app, ["generate", *[str(root / f"{n}.yaml") for n in NEW_SPECS],
                                      "--out", str(root / "newlayers")])
    assert result.exit_code == 0, result.output
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


@pytest.mark.parametrize("name", sorted(NEW_SPECS))
def test_new_layer_matches_its_oracle(generated_root, name):
    module = importlib.import_module(f"newlayers.{name}")
    camel = "".join(part.capitalize() for part in name.split("_"))
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
