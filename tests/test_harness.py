"""The shared harness must reject wrong layers: each check is run against a deliberately broken op."""

from pathlib import Path

import pytest
import torch

from generated.delta_rule import DeltaRule, naive_delta_rule
from generated.gated_delta_rule_l2 import GatedDeltaRuleL2, naive_gated_delta_rule_l2
from ttr_codegen.testing import LayerChecks

SPECS = Path(__file__).resolve().parents[1] / "specs"


def checks_for(naive, layer=DeltaRule, spec="delta_rule"):
    return LayerChecks(SPECS / f"{spec}.yaml", naive, layer)


def test_the_real_op_passes():
    checks = checks_for(naive_delta_rule)
    checks.matches_oracle(63, 16, 12)
    checks.state_carry()


def test_a_slightly_wrong_step_size_is_caught():
    def wrong(q, k, v, beta, *args, **kwargs):
        return naive_delta_rule(q, k, v, beta * 1.001, *args, **kwargs)
    with pytest.raises(AssertionError):
        checks_for(wrong).matches_oracle(63, 16, 12)


def test_a_dropped_initial_state_is_caught():
    def forgetful(*args, initial_state=None, **kwargs):
        return naive_delta_rule(*args, **kwargs)
    with pytest.raises(AssertionError):
        checks_for(forgetful).state_carry()


def test_a_missing_gradient_is_caught():
    def detached(q, k, v, beta, *args, **kwargs):
        return naive_delta_rule(q, k.detach(), v, beta, *args, **kwargs)
    with pytest.raises((AssertionError, RuntimeError)):
        checks_for(detached).gradients_match_oracle()


def test_a_low_precision_state_is_caught():
    def bf16_state(*args, **kwargs):
        o, state = naive_delta_rule(*args, **kwargs)
        return o, (state.to(o.dtype) if state is not None else None)
    with pytest.raises(AssertionError):
        checks_for(bf16_state).low_precision(torch.bfloat16)


def test_a_different_layer_does_not_pass_for_another_spec():
    # The L2 reading of Gated DeltaNet is not the published form: the oracle must tell them apart.
    with pytest.raises(AssertionError):
        checks_for(naive_gated_delta_rule_l2, GatedDeltaRuleL2, spec="gated_delta_rule").matches_oracle(20, 8, 8)


def test_a_gate_factorisation_that_overflows_is_caught():
    # exp(G_i - G_j) split as exp(G_i) * exp(-G_j) over a whole sequence: exact in exact arithmetic, but
    # exp(-G_j) overflows once the gates have forgotten enough, which typical gates never reach.
    from generated.simple_gla import chunk_simple_gla, naive_simple_gla

    def split_gates(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                    chunk_size=64):
        G = torch.cumsum(g, dim=1)[..., None]
        o, state = chunk_simple_gla(q * G.exp(), k * (-G).exp(), v, torch.zeros_like(g), scale=scale,
                                    initial_state=initial_state, output_final_state=True, chunk_size=chunk_size)
        return o, (state * G[:, -1, :, :, None].exp() if output_final_state else None)

    checks = LayerChecks(SPECS / "simple_gla.yaml", naive_simple_gla, None, chunk=split_gates)
    checks.chunk_matches_oracle(63, 16)  # typical gates: indistinguishable from the real op
    with pytest.raises(AssertionError):
        checks.chunk_strong_gates()
