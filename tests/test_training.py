"""Training a model built from generated layers: torch.compile(fullgraph=True) with no graph break."""

import torch

from generated.gated_delta_rule import GatedDeltaRule
from generated.simple_gla import SimpleGla
from generated.titans_mlp import TitansMlp
from generated.ttt_linear import TttLinear
from ttr_codegen.testing import TwoLayers, compiled_matches_eager


def test_two_layer_model_compiles_fullgraph_forward_and_backward():
    """Two families: the delta rule's, then the scalar-gated one."""
    torch.manual_seed(0)
    compiled_matches_eager(TwoLayers(GatedDeltaRule, SimpleGla), torch.randn(2, 37, 32), 1e-6, backend="aot_eager")


def test_nonlinear_memories_compile_fullgraph_forward_and_backward():
    """TTT-Linear, then Titans' MLP memory: their chunked forms (mini-batch loops, derived gradients, the
    dual form) trace without a graph break."""
    torch.manual_seed(0)
    compiled_matches_eager(TwoLayers(TttLinear, TitansMlp).double(), torch.randn(2, 21, 32, dtype=torch.float64), 1e-9,
                           backend="aot_eager")
