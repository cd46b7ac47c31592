"""`ttr eval`: the synthetic tasks' data are what they claim (checked against their definitions), and the
command trains and reports a score for each spec and setting."""

import re

import torch
from typer.testing import CliRunner

from ttr_codegen.cli import app
from ttr_codegen.evaluate import Setting, copy_batch, mqar_batch, regression_batch


def test_mqar_queries_ask_for_the_stored_values():
    setting = Setting("mqar", 6, 40, 64)
    ids, labels = mqar_batch(setting, 8, torch.Generator().manual_seed(0))
    for b in range(8):
        pairs = {ids[b, 2 * i].item(): ids[b, 2 * i + 1].item() for i in range(6)}
        assert len(pairs) == 6 and all(k < 32 <= v for k, v in pairs.items())  # keys low, values high, no repeats
        asked = (labels[b] != -100).nonzero().flatten()
        assert len(asked) == 6 and (asked >= 13).all()  # every key once, after the pairs
        assert sorted(ids[b, asked - 1].tolist()) == sorted(pairs)
        for position in asked.tolist():
            assert labels[b, position].item() == pairs[ids[b, position - 1].item()]


def test_copying_asks_for_the_scattered_tokens_in_order():
    ids, labels = copy_batch(Setting("copy", 4, 20, 30), 5, torch.Generator().manual_seed(1))
    for b in range(5):
        scattered = ids[b, :15][ids[b, :15] > 1]
        assert ids[b, 15] == 1 and torch.equal(labels[b, 16:], scattered) and (labels[b, :16] == -100).all()


def test_regression_targets_are_the_following_y():
    inputs, targets = regression_batch(Setting("regression", 3, 10, 0), 4, torch.Generator().manual_seed(2))
    assert torch.equal(inputs[:, 1::2, 3], targets[:, 0::2]) and targets[:, 1::2].isnan().all()
    assert (inputs[:, 0::2, 3] == 0).all() and (inputs[:, 1::2, :3] == 0).all()


def test_eval_trains_and_reports_each_setting():
    runner = CliRunner()
    for task in ("mqar", "copy", "regression"):
        result = runner.invoke(app, ["eval", "specs/linear_attention.yaml", "--task", task, "--size", "2",
                                     "--steps", "4", "--width", "16", "--seq-len", "16", "--vocab", "32",
                                     "--batch", "4"])
        assert result.exit_code == 0, result.output
        row = re.search(r"^linear_attention\s+2\s+16\s+([0-9.]+)\s+\d+$", result.output, re.MULTILINE)
        assert row is not None, result.output
        assert float(row.group(1)) >= 0 and (task == "regression" or float(row.group(1)) <= 1)
    refused = runner.invoke(app, ["eval", "specs/linear_attention.yaml", "--task", "sorting"])
    assert refused.exit_code == 2 and "--task must be one of" in refused.output
