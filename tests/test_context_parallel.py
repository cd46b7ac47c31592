"""Context parallelism (`context_parallel_<name>`, generated for every layer with a chunked or streaming form:
the layers whose state's affine map the layer itself gives scan those maps, the attention layers gather their
cache of keys, the others run as a pipeline over the ranks): the sequence split over 2 and 4 processes of a gloo
group, against the chunked op (attention: the naive form) on the whole sequence in one process (float64):
outputs, final states and every gradient, batch rows and packed sequences that cross the shards' ends."""

from pathlib import Path

import pytest

from ttr_codegen.testing import context_parallel_layers, context_parallel_matches, free_address, gloo_group

ROOT = Path(__file__).resolve().parents[1]
LAYERS = context_parallel_layers(ROOT / "generated")


def test_layers_found():
    """Every layer of the catalogue with a chunked or streaming form has it: all but kernel ridge and local
    quadratic attention, which have neither."""
    generated = {p.name for p in (ROOT / "generated").iterdir() if (p / "__init__.py").exists()}
    assert set(LAYERS) == generated - {"kernel_ridge_attention", "local_quadratic_attention"}
    assert {"rls", "ttt_linear", "ttt_mlp", "titans_mlp", "softmax_attention", "local_linear_attention_cg",
            "mesa_cg", "gated_delta_rule"} <= set(LAYERS)


# Four ranks (a sequence over three shards) for one layer of each structure: scalar-gated, per-key, sub-steps,
# momentum's stacked state, the gated family, the second order's decaying sums (an affine memory's five
# parts), attention's cache (with a gate's cumulative decay), and the pipeline (RLS's covariance, a nonlinear
# memory's whole state part-way into a mini-batch); two ranks for every layer.
FOUR_RANKS = ["gated_delta_rule", "kda", "delta_product", "titans_linear", "gla", "affine_mesa_cg",
              "forgetting_attention", "rls", "ttt_linear"]


@pytest.mark.parametrize("ranks", [2, 4])
def test_matches_one_process(ranks):
    names = LAYERS if ranks == 2 else FOUR_RANKS
    context_parallel_matches([(str(ROOT / "generated" / name), str(ROOT / "specs" / f"{name}.yaml"))
                              for name in names], ranks)


def test_refuses_offsets_of_another_length():
    """Packed offsets that do not end at ranks * T (a shard of another length, or one rank's offsets alone) are
    refused with a message that names cu_seqlens, before any collective."""
    import torch

    from generated.gated_delta_rule import context_parallel_gated_delta_rule

    with gloo_group(0, 1, free_address()):
        q = k = torch.randn(1, 8, 2, 4)
        v = torch.randn(1, 8, 2, 3)
        g, beta = -torch.rand(1, 8, 2), torch.rand(1, 8, 2)
        with pytest.raises(ValueError, match="cu_seqlens packs the whole batch"):
            context_parallel_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 3, 10]))
        o, _ = context_parallel_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 3, 8]))
        assert o.shape == (1, 8, 2, 3)


def test_attention_refuses_a_cache_with_packed_sequences():
    """An attention layer's initial cache is per batch row: with packed sequences it is refused, naming both."""
    import torch

    from generated.softmax_attention import context_parallel_softmax_attention

    with gloo_group(0, 1, free_address()):
        q = k = torch.randn(1, 8, 2, 4)
        v = torch.randn(1, 8, 2, 3)
        cache = (torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 3))
        with pytest.raises(ValueError, match="initial_state .* cannot be combined with cu_seqlens"):
            context_parallel_softmax_attention(q, k, v, initial_state=cache, cu_seqlens=torch.tensor([0, 3, 8]))
        o, final = context_parallel_softmax_attention(q, k, v, initial_state=cache, output_final_state=True)
        assert o.shape == (1, 8, 2, 3) and final[0].shape == (1, 10, 2, 4)
