"""How many conjugate-gradient steps local-linear attention needs to agree with the exact solve, on a CPU.

    python benchmarks/cg_steps_cpu.py [--T 4096] [--widths 64 128] [--steps 2 4 8 12 16 24 32]

At the GPU benchmark's shapes (B = 1, H = 16, random normal q, k, v, scale D^-1/2, the catalogue's ridge
0.1), for 32 query rows spread over the sequence: the output of n steps in float32 (the covariance formed
explicitly, the same algorithm and rounding-level stop as the kernels' matrix-free steps) against the exact
solve in float64, max |o - o_exact| / max |o_exact|. The GPU benchmark (attention_gpu.py) measures the
kernels themselves the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_gpu import exact_local_linear, local_linear_rows  # noqa: E402


def conjugate_gradients(system: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """x with system x = b by `steps` conjugate-gradient steps from 0, per head (a row stops at a rounding-level
    residual, as the kernels' steps do)."""
    x, r, p = torch.zeros_like(b), b.clone(), b.clone()
    rr = (r * r).sum(-1)
    converged = torch.finfo(b.dtype).eps ** 2 * rr
    for _ in range(steps):
        Ap = torch.einsum("hkl,hl->hk", system, p)
        curvature = (p * Ap).sum(-1)
        active = (rr > converged) & (curvature > 0)
        alpha = torch.where(active, rr / torch.where(active, curvature, 1.0), 0.0)
        x, r = x + alpha[:, None] * p, r - alpha[:, None] * Ap
        rr_next = (r * r).sum(-1)
        p = r + torch.where(active, rr_next / torch.where(rr > 0, rr, 1.0), 0.0)[:, None] * p
        rr = rr_next
    return x


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--widths", nargs="*", type=int, default=[64, 128])
    parser.add_argument("--steps", nargs="*", type=int, default=[2, 4, 8, 12, 16, 24, 32])
    args = parser.parse_args()
    H, ridge = 16, 0.1
    print(f"T={args.T} H={H}, 32 query rows; gap = max |o - o_exact| / max |o_exact|, float32 steps")
    print(f"{'D':>4} " + " ".join(f"{n:>9}" for n in args.steps))
    for D in args.widths:
        generator = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(1, args.T, H, D, generator=generator) for _ in range(3))
        rows = torch.linspace(0, args.T - 1, 32).long().tolist()
        exact = exact_local_linear(q, k, v, rows, D ** -0.5, ridge)
        gaps = [((local_linear_rows(q, k, v, rows, D ** -0.5, ridge, lambda A, b, n=n: conjugate_gradients(A, b, n))
                  .double() - exact).abs().max() / exact.abs().max()).item() for n in args.steps]
        print(f"{D:>4} " + " ".join(f"{g:>9.2e}" for g in gaps), flush=True)


if __name__ == "__main__":
    main()
