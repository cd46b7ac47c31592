"""Context parallelism on one GPU without NCCL: two processes of a gloo group share the GPU (gloo all-reduces GPU
tensors; its all-gathers and point-to-point sends go through host memory, `_through_host`), each running its
shard on the layer's GPU path (the Triton kernels where the layer has them) in float32, against the same layer on
the whole sequences in one process: outputs, final states and every gradient, batch rows and packed sequences
across the shards (K = 16, chunks of 16 that the shards' 40 tokens cut; `testing._ON_GPU`). One layer of each
form: the scan of affine maps (gated_delta_rule, and mesa_cg's decaying sums), the gathered cache
(softmax_attention, forgetting_attention), the pipeline (rls, ttt_linear)."""

from pathlib import Path

import pytest

from ttr_codegen.testing import context_parallel_matches

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["gated_delta_rule", "mesa_cg", "softmax_attention", "forgetting_attention", "rls", "ttt_linear"]

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", LAYERS)
def test_matches_one_process_on_the_gpu(name):
    context_parallel_matches([(str(ROOT / "generated" / name), str(ROOT / "specs" / f"{name}.yaml"))], ranks=2,
                             device="cuda")
