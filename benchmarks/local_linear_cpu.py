"""Local linear attention on CPU: time against softmax attention, and peak memory (T = 2048, K = V = 64).

Each op runs in a fresh process so that its peak resident memory can be read from the OS.

    python benchmarks/local_linear_cpu.py [--T 2048] [--K 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPS = {
    "flash_softmax_attention": "generated.softmax_attention",
    "flash_local_linear_attention": "generated.local_linear_attention",
    "naive_softmax_attention": "generated.softmax_attention",
}


def measure(op: str, B: int, T: int, H: int, K: int, repeats: int) -> dict:
    """Runs in the child process: time `op` (median of `repeats`) and report peak RSS growth."""
    import importlib

    import torch

    torch.manual_seed(0)
    q = torch.randn(B, T, H, K)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.randn(B, T, H, K)
    fn = getattr(importlib.import_module(OPS[op]), op)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(q, k, v)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"op": op, "seconds": sorted(times)[len(times) // 2], "peak_mib": (peak - baseline) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--H", type=int, default=1)
    parser.add_argument("--K", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.B, args.T, args.H, args.K, args.repeats)))
        return
    import torch

    print(f"CPU, float32, B={args.B} T={args.T} H={args.H} K=V={args.K}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}")
    rows = {}
    for op in OPS:
        out = subprocess.run([sys.executable, __file__, "--child", op, "--B", str(args.B), "--T", str(args.T),
                              "--H", str(args.H), "--K", str(args.K), "--repeats", str(args.repeats)],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        rows[op] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'op':32s} {'time (s)':>10s} {'peak RSS growth (MiB)':>22s}")
    for row in rows.values():
        print(f"{row['op']:32s} {row['seconds']:10.3f} {row['peak_mib']:22.1f}")
    ratio = rows["flash_local_linear_attention"]["seconds"] / rows["flash_softmax_attention"]["seconds"]
    print(f"local linear / softmax (both streaming): {ratio:.1f}x the time")
    moments = args.B * args.H * args.T * (args.K * args.K + args.K * args.K) * 4 / 2**20
    full = args.B * args.H * args.T * args.T * args.K * args.K * 4 / 2**20
    print(f"O(T K^2) moments for all queries: {moments:.0f} MiB; a [T, T, K, K] tensor would be {full:.0f} MiB")


if __name__ == "__main__":
    main()
