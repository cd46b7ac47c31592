"""Training a model built from generated layers: torch.compile(fullgraph=True) with no graph break."""

import torch
from torch import nn

from generated.gated_delta_rule import GatedDeltaRule
from generated.simple_gla import SimpleGla
from generated.titans_mlp import TitansMlp
from generated.ttt_linear import TttLinear
from ttr_codegen.testing import compiled_matches_eager


class TwoLayers(nn.Module):
    """A residual stack of two generated layers of different families (delta rule, scalar-gated)."""

    def __init__(self, width: int = 32, heads: int = 2):
        super().__init__()
        self.first = GatedDeltaRule(width, heads)
        self.second = SimpleGla(width, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.first(x)[0]
        return x + self.second(x)[0]


def test_two_layer_model_compiles_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    compiled_matches_eager(TwoLayers(), torch.randn(2, 37, 32), 1e-6, backend="aot_eager")


class NonlinearMemories(nn.Module):
    """A residual stack of the nonlinear memories: TTT-Linear, then Titans' MLP memory."""

    def __init__(self, width: int = 32, heads: int = 2):
        super().__init__()
        self.first = TttLinear(width, heads)
        self.second = TitansMlp(width, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.first(x)[0]
        return x + self.second(x)[0]


def test_nonlinear_memories_compile_fullgraph_forward_and_backward():
    """Their chunked forms (mini-batch loops, derived gradients, the dual form) trace without a graph break."""
    torch.manual_seed(0)
    compiled_matches_eager(NonlinearMemories().double(), torch.randn(2, 21, 32, dtype=torch.float64), 1e-9,
                           backend="aot_eager")
