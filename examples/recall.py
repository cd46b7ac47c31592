"""Associative recall: how well does each memory read back the pairs it stored?

Stores n key-value pairs, then queries every stored key and measures the relative read-back error
||o_j - v_j||^2 / ||v_j||^2, for n = 1 .. 2K, with random unit keys and with correlated keys.
Linear attention ignores key correlations (cross-talk); the exact least-squares memory (mesa with a
tiny ridge) recalls every pair while n <= K; the delta rule and Longhorn sit in between.

    python examples/recall.py            # writes docs/recall.png and prints the table
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generated.delta_rule import naive_delta_rule  # noqa: E402
from generated.linear_attention import naive_linear_attention  # noqa: E402
from generated.longhorn import naive_longhorn  # noqa: E402
from generated.mesa import naive_mesa  # noqa: E402

K = V = 32


def keys(n: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """n unit keys [n, K]: independent random directions, or directions around a shared one."""
    noise = torch.randn(n, K, generator=generator, dtype=torch.float64)
    if kind == "correlated":
        shared = torch.randn(1, K, generator=generator, dtype=torch.float64)
        noise = 2.0 * shared + noise
    return F.normalize(noise, dim=-1)


def recall_error(layer: str, n: int, kind: str, seed: int = 0) -> float:
    """Write n pairs, then read every key back (read tokens write nothing); mean relative error."""
    g = torch.Generator().manual_seed(seed)
    k = keys(n, kind, g)
    v = torch.randn(n, V, generator=g, dtype=torch.float64)
    # A sequence of 2n tokens: n writes, then n reads whose writes have zero strength.
    q_seq = torch.cat([k, k])[None, :, None]
    k_seq = torch.cat([k, k])[None, :, None]
    v_seq = torch.cat([v, torch.zeros_like(v)])[None, :, None]
    write = torch.cat([torch.ones(n), torch.zeros(n)]).double()[None, :, None]
    if layer == "linear attention":
        o, _ = naive_linear_attention(q_seq, k_seq, v_seq, scale=1.0)
    elif layer == "DeltaNet":
        o, _ = naive_delta_rule(q_seq, k_seq, v_seq, write, scale=1.0)
    elif layer == "Longhorn":
        o, _ = naive_longhorn(q_seq, k_seq, v_seq, 100.0 * write, scale=1.0)
    elif layer == "mesa (exact)":
        lamb = torch.full((1, K), 1e-6, dtype=torch.float64)
        o, _ = naive_mesa(q_seq, k_seq, v_seq, torch.zeros_like(write), write, lamb, scale=1.0)
    else:
        raise ValueError(layer)
    read = o[0, n:, 0]
    return ((read - v) ** 2).sum(-1).div((v ** 2).sum(-1)).mean().item()


LAYERS = ["linear attention", "DeltaNet", "Longhorn", "mesa (exact)"]


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = list(range(1, 2 * K + 1))
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, kind in zip(axes, ["random", "correlated"]):
        print(f"{kind} keys (K = {K}): relative read-back error")
        print("  n   " + "  ".join(f"{name:>16}" for name in LAYERS))
        for name in LAYERS:
            errors = [recall_error(name, n, kind) for n in counts]
            axis.plot(counts, errors, label=name, linestyle="--" if name == "DeltaNet" else "-")
        for n in (4, 16, 32, 48, 64):
            print(f"  {n:<3} " + "  ".join(f"{recall_error(name, n, kind):>16.3g}" for name in LAYERS))
        axis.axvline(K, color="grey", linestyle=":", linewidth=1)
        axis.set_yscale("symlog", linthresh=1e-3)
        axis.set_title(f"{kind} unit keys, K = {K}")
        axis.set_xlabel("stored pairs n")
    axes[0].set_ylabel("relative read-back error")
    axes[0].legend()
    figure.tight_layout()
    out = Path(__file__).resolve().parents[1] / "docs" / "recall.png"
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
