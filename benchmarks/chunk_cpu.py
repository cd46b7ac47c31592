"""Chunked vs token-by-token: every generated chunk_<name> against its naive_<name>, on CPU.

    python benchmarks/chunk_cpu.py [--B 2 --T 2048 --H 4 --K 64 --V 64 --repeats 7] [--system-malloc]

Nonlinear memories (ttt_linear, ttt_mlp, titans_mlp) run with V = K and random starting weights.

By default the script re-runs itself with glibc's heap kept (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_):
otherwise glibc hands every freed block above 128 KiB back to the kernel and page-faults it in again on
the next allocation, and on a virtual machine those faults alone made the same chunked call vary 2-4x
from one process to the next. --system-malloc measures with the allocator's defaults.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ttr_codegen.spec import load_spec  # noqa: E402
from ttr_codegen.testing import LayerChecks, OnlineChecks  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and dispatch caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, default in (("B", 2), ("T", 2048), ("H", 4), ("K", 64), ("V", 64), ("repeats", 7)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(chunk_<name>, fullgraph=True) (Inductor; compile time not counted)")
    parser.add_argument("--only", nargs="*", default=None, help="layer names to run")
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc's default trimming of the heap")
    args = parser.parse_args()
    keep_heap = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32)}
    if not args.system_malloc and any(os.environ.get(k) != v for k, v in keep_heap.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **keep_heap})
    print(f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, float32, "
          f"B={args.B} T={args.T} H={args.H} K={args.K} V={args.V}, median of {args.repeats}, "
          f"{'system malloc' if args.system_malloc else 'heap kept (no page faults per allocation)'}")
    header = f"{'layer':22s} {'naive (s)':>10s} {'chunk (s)':>10s} {'speed-up':>9s}"
    print(header + (f" {'compiled (s)':>13s} {'speed-up':>9s}" if args.compile else ""))
    for package in sorted((ROOT / "generated").iterdir()):
        if not (package / "chunk.py").exists():
            continue
        name = package.name
        if args.only and name not in args.only:
            continue
        module = importlib.import_module(f"generated.{name}")
        spec_path = ROOT / "specs" / f"{name}.yaml"
        extra = {}
        if load_spec(spec_path).regressor.cls == "mlp":  # nonlinear memories: V = K, starting weights given
            problem, initial = OnlineChecks(spec_path, None, None, None).problem(args.T, args.K, B=args.B, H=args.H)
            extra = {"initial_state": tuple(x.float() for x in initial)}
        else:
            problem = LayerChecks(spec_path, None, None).problem(args.T, args.K, args.V, B=args.B, H=args.H)
        problem = problem.to(torch.float32)
        naive, chunk = getattr(module, f"naive_{name}"), getattr(module, f"chunk_{name}")
        with torch.no_grad():
            t_naive = median_seconds(lambda: naive(*problem.args(), **extra), args.repeats)
            t_chunk = median_seconds(lambda: chunk(*problem.args(), **extra), args.repeats)
            line = f"{name:22s} {t_naive:10.3f} {t_chunk:10.4f} {t_naive / t_chunk:8.1f}x"
            if args.compile and not extra:  # (the nonlinear memories' mini-batch loop is not compiled)
                compiled = torch.compile(chunk, fullgraph=True)
                t_compiled = median_seconds(lambda: compiled(*problem.args()), args.repeats)
                line += f" {t_compiled:13.4f} {t_naive / t_compiled:8.1f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
