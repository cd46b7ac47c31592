"""How accurate `rls_triton`'s gradients are in float32, by chunks and token by token, as forgetting grows (CPU).

Runs the generated kernels themselves under Triton's interpreter (TRITON_INTERPRET=1, set here) with each
setting the tests run (testing.RLS_KERNEL_SETTINGS, FORWARD:BACKWARD[:GAINS[:CHUNK[:PRODUCTS[:LOOPS]]]]) or those
given, a forward and a backward with gradients into the output and both final states, against autograd through
naive_rls in float64, and prints the largest error of every gradient relative to its largest reference value (P's
symmetric part: only that acts on a covariance).

    python benchmarks/rls_backward_study.py [--out FILE] [--T 256] [--D 32] [--settings chunks:chunks:warps:32 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the kernels run on the CPU

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from delta_family_gpu import teller  # noqa: E402  (this folder is on sys.path when a script here runs)
from generated.rls import chunk, rls_triton  # noqa: E402
from generated.rls.naive import naive_rls  # noqa: E402
from rls_chunk_study import problem, relative  # noqa: E402
from ttr_codegen.testing import RLS_KERNEL_SETTINGS, rls_kernel_settings, symmetric_part  # noqa: E402

NAMES = ("q", "k", "v", "g", "S", "P")


def gradients(op, inputs, state, d_out, d_state, dtype) -> tuple:
    leaves = [x.to(dtype).requires_grad_(True) for x in (*inputs, *state)]
    o, final = op(*leaves[:4], initial_state=tuple(leaves[4:]), output_final_state=True)
    loss = (o * d_out.to(dtype)).sum() + sum((f * d.to(dtype)).sum() for f, d in zip(final, d_state))
    found = list(torch.autograd.grad(loss, leaves))
    found[-1] = symmetric_part(found[-1])
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--T", type=int, default=256)
    parser.add_argument("--D", type=int, default=32, help="K = V")
    parser.add_argument("--forgets", nargs="*", type=float, default=[0.0, 0.02, 0.1, 0.2])
    parser.add_argument("--settings", nargs="*", default=RLS_KERNEL_SETTINGS,
                        help="FORWARD:BACKWARD[:GAINS[:CHUNK[:PRODUCTS[:LOOPS]]]] (testing.rls_kernel_settings); "
                             "default: the tests'")
    args = parser.parse_args()
    say = teller(args.out)
    chunk._rls_in_triton = lambda *args: True  # the kernels take the call on the CPU
    B, H = 1, 2
    say(f"rls_triton's gradients in float32 (interpreter) against autograd through naive_rls in float64: B={B} "
        f"H={H} K=V={args.D} T={args.T}, checkpoint every {rls_triton.CHECKPOINT} tokens, log-decays uniform in "
        "[-forget, 0]; the largest error of each gradient relative to its largest reference value")
    say(f"{'forward:backward':21s} {'forget':>7s} " + " ".join(f"{'d' + n:>9s}" for n in NAMES))
    for forget in args.forgets:
        inputs, state = problem(B, args.T, H, args.D, forget)
        generator = torch.Generator().manual_seed(1)
        d_out = torch.randn(inputs[2].shape, dtype=torch.float64, generator=generator)
        d_state = [torch.randn(s.shape, dtype=torch.float64, generator=generator) for s in state]
        expected = gradients(naive_rls, inputs, state, d_out, d_state, torch.float64)
        for pair in args.settings:
            vars(rls_triton).update(rls_kernel_settings(pair))
            found = gradients(chunk.chunk_rls, inputs, state, d_out, d_state, torch.float32)
            say(f"{pair:21s} {forget:7.2f} " + " ".join(f"{relative(f, e):9.2e}" for f, e in zip(found, expected)))


if __name__ == "__main__":
    main()
