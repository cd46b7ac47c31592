"""Training a model built from generated layers: torch.compile(fullgraph=True) with no graph break."""

import torch
from torch import nn

from generated.gated_delta_rule import GatedDeltaRule
from generated.simple_gla import SimpleGla


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
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TwoLayers()
    x = torch.randn(2, 37, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # raises on any graph break
    out = compiled(x)
    out.square().mean().backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x)
    eager.square().mean().backward()
    torch.testing.assert_close(out, eager)
    for compiled_grad, p in zip(compiled_grads, model.parameters(), strict=True):
        torch.testing.assert_close(compiled_grad, p.grad)
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in model.parameters())
