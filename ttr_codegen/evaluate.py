"""Invent a layer, then test it: train small models built from generated layers on synthetic tasks.

Tasks (each a generator of batches, new data every step, so a model cannot memorise):
- `mqar`: multi-query associative recall, Zoology's protocol: key-value pairs, then the keys again at random
  later positions, each to be answered with its value;
- `copy`: selective copying: a few tokens scattered among blanks, to be repeated in order after a marker;
- `regression`: in-context linear regression: pairs (x_i, w . x_i) with a new w per sequence, each y to be
  predicted from the pairs before it (a mean squared error; inputs embedded by a linear read-in).

Models are `ttr_codegen.models.TTRForCausalLM` (needs `pip install ttr[models]`), a few blocks of the spec's
layer, trained with AdamW on the GPU when there is one.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("mqar", "copy", "regression")


@dataclass
class Setting:
    """One training run's task difficulty: MQAR's pairs, copying's tokens, regression's dimension."""
    task: str
    size: int  # key-value pairs (mqar), tokens to copy (copy), input dimension (regression)
    seq_len: int
    vocab: int


def mqar_batch(setting: Setting, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) `[batch, seq_len]`: pairs k_1 v_1 .. k_n v_n (keys from the vocabulary's lower half,
    values from its upper half, no key twice), then zeros with each key placed once more at a random position;
    the label after a repeated key is its value (-100 elsewhere: not scored)."""
    n, L, V = setting.size, setting.seq_len, setting.vocab
    if 4 * n > L or 2 * n > V // 2:
        raise ValueError(f"mqar: {n} pairs need seq_len >= {4 * n} and vocab >= {4 * n}")
    keys = _distinct(batch, V // 2 - 1, n, generator) + 1
    values = torch.randint(V // 2, V, (batch, n), generator=generator)
    ids = torch.zeros(batch, L, dtype=torch.long)
    labels = torch.full((batch, L), -100, dtype=torch.long)
    ids[:, 0:2 * n:2], ids[:, 1:2 * n:2] = keys, values
    # queries: every key once, in a random order, at distinct positions after the pairs (not the last)
    positions = _distinct(batch, L - 2 * n - 1, n, generator) + 2 * n
    order = _distinct(batch, n, n, generator)
    ids.scatter_(1, positions, keys.gather(1, order))
    labels.scatter_(1, positions + 1, values.gather(1, order))
    return ids, labels


def _distinct(batch: int, high: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """`[batch, n]`: per row, n distinct integers drawn uniformly from 0 .. high - 1 (a random permutation's
    first n, drawn for the whole batch at once: a loop over rows made data the bottleneck of small models)."""
    return torch.rand(batch, high, generator=generator).argsort(-1)[:, :n]


def copy_batch(setting: Setting, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels): n tokens (from 2 .. vocab - 1) at random positions among blanks (0) in the first
    seq_len - n - 1 positions, a marker (1), then the n tokens again, in order, each labelled (predicted from
    what precedes it)."""
    n, L, V = setting.size, setting.seq_len, setting.vocab
    context = L - n - 1
    if context < n:
        raise ValueError(f"copy: {n} tokens need seq_len >= {2 * n + 1}")
    tokens = torch.randint(2, V, (batch, n), generator=generator)
    ids = torch.zeros(batch, L, dtype=torch.long)
    ids.scatter_(1, _distinct(batch, context, n, generator).sort(-1).values, tokens)
    ids[:, context] = 1
    ids[:, context + 1:] = tokens
    labels = torch.full((batch, L), -100, dtype=torch.long)
    labels[:, context + 1:] = tokens
    return ids, labels


def regression_batch(setting: Setting, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs `[batch, seq_len, d + 1]`, targets `[batch, seq_len]`): tokens alternate x_i (in the first d
    features) and y_i = w . x_i / sqrt(d) (in the last), w new per sequence; the target at each x token is its
    y, predicted from the pairs before it (NaN elsewhere: not scored)."""
    d, L = setting.size, setting.seq_len
    pairs = L // 2
    x = torch.randn(batch, pairs, d, generator=generator)
    w = torch.randn(batch, d, 1, generator=generator)
    y = (x @ w).squeeze(-1) / math.sqrt(d)
    inputs = torch.zeros(batch, 2 * pairs, d + 1)
    inputs[:, 0::2, :d] = x
    inputs[:, 1::2, d] = y
    targets = torch.full((batch, 2 * pairs), float("nan"))
    targets[:, 0::2] = y
    return inputs, targets


class RegressionModel(nn.Module):
    """A linear read-in, the model's blocks, a linear read-out of one number per token."""

    def __init__(self, config, d: int) -> None:
        super().__init__()
        from .models import TTRModel

        self.read_in = nn.Linear(d + 1, config.hidden_size)
        self.model = TTRModel(config)
        self.read_out = nn.Linear(config.hidden_size, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.model(inputs_embeds=self.read_in(inputs), use_cache=False).last_hidden_state
        return self.read_out(hidden).squeeze(-1)


def load_layer(spec: Path, folder: Path) -> tuple[str, str]:
    """Compile `spec` into folder/ttr_eval_layers/<name> and make it importable: (package, name)."""
    from .pipeline import compile_spec
    from .render.writer import plan_changes, write_atomically

    root = folder / "ttr_eval_layers"
    compiled = compile_spec(spec, root)
    changes = plan_changes(root, [_init_file()]) + plan_changes(compiled.package_dir, compiled.files)
    write_atomically(changes, force=True)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return "ttr_eval_layers", compiled.spec.name


def _init_file():
    from .render.files import RenderedFile

    return RenderedFile("__init__.py", '"""Layers generated by `ttr eval`."""\n')


def train(package: str, name: str, setting: Setting, width: int, blocks: int, heads: int, steps: int,
          batch: int, lr: float, layer_kwargs: dict, device: str, seed: int = 0, progress=None) -> dict:
    """Train one model on one setting; its score on fresh batches: accuracy (token tasks) or the mean
    squared error relative to the targets' variance (regression)."""
    from .models import TTRConfig, TTRForCausalLM

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    config = TTRConfig(vocab_size=setting.vocab, hidden_size=width, num_hidden_layers=blocks, num_heads=heads,
                       layers=[name], package=package, layer_kwargs=layer_kwargs, use_cache=False)
    make = {"mqar": mqar_batch, "copy": copy_batch, "regression": regression_batch}[setting.task]
    model = (RegressionModel(config, setting.size) if setting.task == "regression" else TTRForCausalLM(config))
    model = model.to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.1)
    start, last_loss = time.perf_counter(), float("nan")
    for _ in range(steps):
        inputs, targets = (t.to(device) for t in make(setting, batch, generator))
        loss = _loss(model, setting.task, inputs, targets)[0]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        last_loss = loss.item()
        if progress is not None:
            progress(last_loss)
    model.eval()
    with torch.no_grad():
        scores = [_loss(model, setting.task, *(t.to(device) for t in make(setting, batch, generator)))[1]
                  for _ in range(4)]
    return {"score": sum(scores) / len(scores), "loss": last_loss, "seconds": time.perf_counter() - start,
            "parameters": sum(p.numel() for p in model.parameters())}


def _loss(model, task: str, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(the training loss, the score): cross-entropy and accuracy on labelled tokens, or the mean squared error
    and its ratio to the targets' variance."""
    if task == "regression":
        kept = ~targets.isnan()
        error = (model(inputs)[kept] - targets[kept]).square().mean()
        return error, (error / targets[kept].var()).item()
    logits = model(input_ids=inputs, use_cache=False).logits[:, :-1]
    labels = targets[:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    scored = labels != -100
    return loss, (logits.argmax(-1)[scored] == labels[scored]).float().mean().item()


def default_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="ttr-eval-"))
