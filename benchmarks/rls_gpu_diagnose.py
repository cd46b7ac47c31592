"""Which launch setting of rls_triton's chunk kernels changes their results on a GPU: every gradient's error
(relative to 1 + its largest float64 value, naive_rls on the device as the reference) for each
FORWARD:BACKWARD[:GAINS] under each warps / dot-precision override, each in its own process (a fault poisons
the CUDA context).

    python benchmarks/rls_gpu_diagnose.py [--T 16 63] [--widths 64x64 128x128] [--warps 0 4 8 16] [--dots tf32x3 ieee]
(warps 0: the module's own choice) [--mma v3 v2]. Each row compiles its kernels afresh: about a minute a row on
the H100 host, so ask for few rows in one device call."""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H = 4


def check(T: int, K: int, V: int, warps: int, dot: str, pair: str) -> str:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from generated.rls import chunk, chunk_rls, naive_rls, rls_triton
    from ttr_codegen.testing import rls_kernel_settings, symmetric_part

    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a CPU: the kernels under TRITON_INTERPRET=1
    if device == "cpu":
        chunk._rls_in_triton = lambda *args: True

    launch = rls_triton._launch

    def overridden(*args, **kwargs):
        settings = launch(*args, **kwargs)
        if warps:
            settings["num_warps"] = warps
        if "DOT" in settings:
            settings["DOT"] = dot
        return settings

    rls_triton._launch = overridden
    vars(rls_triton).update(rls_kernel_settings(pair))
    generator = torch.Generator(device=device).manual_seed(T)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float64, generator=generator)

    def draw(rows):
        return [randn(2, rows, H, K), F.normalize(randn(2, rows, H, K), dim=-1), randn(2, rows, H, V),
                F.logsigmoid(randn(2, rows, H) + 4)]

    _, state = naive_rls(*draw(100), output_final_state=True)
    inputs = draw(T)
    d_out = randn(2, T, H, V)
    d_final = [randn(*s.shape) for s in state]

    def run(op, leaves):
        o, final = op(*leaves[:4], initial_state=tuple(leaves[4:]), output_final_state=True)
        loss = (o.double() * d_out).sum() + sum((f.double() * d).sum() for f, d in zip(final, d_final))
        return [o, *final, *torch.autograd.grad(loss, leaves)]

    found = run(chunk_rls, [x.float().requires_grad_(True) for x in inputs] + [s.float().requires_grad_(True)
                                                                                 for s in state])
    expected = run(naive_rls, [x.clone().requires_grad_(True) for x in (*inputs, *state)])
    found[-1], expected[-1] = symmetric_part(found[-1]), symmetric_part(expected[-1])
    names = ["o", "S_T", "P_T", "dq", "dk", "dv", "dg", "dS", "dP"]
    return " ".join(f"{n}={((a.double() - b).abs().max() / (1 + b.abs().max())).item():.1e}"
                    for n, a, b in zip(names, found, expected))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[16, 63])
    parser.add_argument("--widths", nargs="+", default=["64x64"])
    parser.add_argument("--warps", type=int, nargs="+", default=[0, 4, 8])
    parser.add_argument("--dots", nargs="+", default=["tf32x3", "ieee"])
    parser.add_argument("--pairs", nargs="+", default=["chunks:chunks"])
    parser.add_argument("--mma", nargs="+", default=["v3"], help="v2: Hopper's warp-group MMA off (DISABLE_MMA_V3)")
    parser.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        T, K, V, warps, dot, pair = args.one
        print(check(int(T), int(K), int(V), int(warps), dot, pair))
        return
    settings = itertools.product(args.widths, args.T, args.pairs, args.warps, args.dots, args.mma)
    for width, T, pair, warps, dot, mma in settings:
        K, V = width.split("x")
        env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1", TRITON_CACHE_DIR=f"/tmp/triton-cache-{mma}")
        if mma == "v2":
            env["DISABLE_MMA_V3"] = "1"
        result = subprocess.run([sys.executable, __file__, "--one", str(T), K, V, str(warps), dot, pair],
                                capture_output=True, text=True, timeout=300, env=env)
        last = (result.stdout.strip() or result.stderr.strip() or "?").splitlines()[-1]
        print(f"K={K} V={V} T={T} {pair} warps={warps or 'own'} dot={dot} mma={mma}: {last}", flush=True)


if __name__ == "__main__":
    main()
