"""Sharded training: a model of generated layers takes a training step under DDP (eager and around
torch.compile) and FSDP2 (`fully_shard`) in two processes of a gloo group, with the same loss and gradients as
one process on the whole batch (float64; one layer of each family)."""

import pytest
import torch.multiprocessing as mp

from ttr_codegen.testing import SHARDED_LAYERS, free_address, sharded_training_worker


@pytest.mark.parametrize("wrapping", ["ddp", "fsdp2", "ddp_compiled"])
def test_training_step_matches_one_process(wrapping):
    mp.spawn(sharded_training_worker, args=(2, free_address(), SHARDED_LAYERS, wrapping), nprocs=2, join=True)
