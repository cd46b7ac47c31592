"""Per-kernel GPU time of a generated chunked Triton forward and of fla-core's peer, from torch.profiler.

    python benchmarks/kernel_profile_gpu.py delta_rule gated_delta_rule [--B 8 --T 2048] [--backward]

Shows where a layer's forward (or, with --backward, its forward and backward: the training path of
chunk_<name>) spends its time, kernel by kernel, bf16, H=16, K=V=128.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
import triton
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from chunk_gpu import PEERS  # noqa: E402
from ttr_codegen.testing import LayerChecks  # noqa: E402

# The forward benchmark's peers, and those of the delta family (timed end to end by delta_family_gpu.py).
PROFILE_PEERS = PEERS | {
    "kda": ("fla.ops.kda", "chunk_kda", lambda i: {"g": i["g"], "beta": i["beta"]}),
    "gated_delta_product": ("fla.ops.gated_delta_product", "chunk_gated_delta_product",
                            lambda i: {"g": i["g"], "beta": i["beta"], "num_householder": 2}),
}


def kernel_times(fn, repeats: int = 20) -> list[tuple[str, float]]:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / repeats / 1e3) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("layers", nargs="+")
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--backward", action="store_true", help="forward + backward of every input")
    parser.add_argument("--no-peer", action="store_true", help="profile ours only (fla's first call autotunes for minutes)")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, bf16, B={args.B} T={args.T} H=16 K=V=128")
    for name in args.layers:
        module = importlib.import_module(f"generated.{name}")
        ours = (getattr(module, f"chunk_{name}") if args.backward else
                getattr(importlib.import_module(f"generated.{name}.chunk_triton"), f"chunk_{name}_triton"))
        checks = LayerChecks(ROOT / "specs" / f"{name}.yaml", None, None)
        p = checks.problem(args.T, 128, 128, B=args.B, H=16).to(torch.bfloat16, "cuda")
        leaves = [p.q, p.k, p.v, *checks.per_token_inputs(p.inputs)]
        d_out = torch.randn(*p.q.shape[:-1], p.v.shape[-1], device=p.v.device, dtype=p.v.dtype)  # per token (not per sub-step)

        def step(run):
            if not args.backward:
                return run
            return lambda: torch.autograd.grad(run(), leaves, d_out)

        runs = {"ours": step(lambda: ours(*p.args())[0])}
        if PROFILE_PEERS.get(name) and not args.no_peer:
            module_name, function, kwargs = PROFILE_PEERS[name]
            peer = getattr(importlib.import_module(module_name), function)
            runs["fla"] = step(lambda: peer(p.q, p.k, p.v, **kwargs(p.inputs))[0])
        for x in leaves:
            x.requires_grad_(args.backward)
        with torch.set_grad_enabled(args.backward):
            for who, fn in runs.items():
                try:
                    total = triton.testing.do_bench(fn)
                except Exception as error:  # e.g. fla's guard on this Triton version
                    print(f"{name} / {who}: refuses ({type(error).__name__}: {str(error)[:60]})")
                    continue
                print(f"{name} / {who}: {total:.4f} ms (do_bench)")
                for kernel, ms in kernel_times(fn)[:12]:
                    print(f"    {ms:8.4f} ms  {kernel[:90]}")

if __name__ == "__main__":
    main()
