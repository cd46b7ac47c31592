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
