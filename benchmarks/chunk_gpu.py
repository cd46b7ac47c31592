"""Chunked forward on the GPU: generated Triton kernels against fla-core's chunk kernels, bf16.

    python benchmarks/chunk_gpu.py [--out log.txt]

Shapes B=8 T=2048 and B=2 T=8192, H=16, K=V=128; `triton.testing.do_bench` median ms, tokens/s, the ratio
fla / ours (> 1: ours is faster), the fraction of the memory floor (reading q, k, v and writing o once at
the measured device-to-device copy bandwidth) and the largest gap between the two outputs relative to the
largest output (both must compute the same layer for the times to compare). The first call of each
kernel at each shape is timed apart, from an empty Triton cache: it includes compiling (and, for fla,
autotuning).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

# An empty Triton cache, so that each kernel's first call includes its compilation, as on a fresh GPU.
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="ttr-bench-triton-"))

import torch  # noqa: E402
import triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ttr_codegen.testing import LayerChecks  # noqa: E402


def first_call_seconds(run) -> float:
    """Wall time of one call, including whatever compiling or autotuning it does first."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return time.perf_counter() - start

PEERS = {  # layer -> (fla module, function, extra keyword arguments from our inputs); None: fla has no such layer
    "delta_rule": ("fla.ops.delta_rule", "chunk_delta_rule", lambda i: {"beta": i["beta"]}),
    "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule", lambda i: {"g": i["g"], "beta": i["beta"]}),
    "longhorn": None,
    # fla's (gated) DeltaProduct without its gate: the same k, v, beta layout, n sub-steps per token.
    "delta_product": ("fla.ops.gated_delta_product", "chunk_gated_delta_product",
                      lambda i: {"g": None, "beta": i["beta"], "num_householder": 2}),
    "simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla", lambda i: {"g": i["g"]}),
    "gla": ("fla.ops.gla", "chunk_gla", lambda i: {"g": i["g"]}),
    "linear_attention": ("fla.ops.linear_attn", "chunk_linear_attn", lambda i: {"normalize": False}),
    "retnet": ("fla.ops.retention", "chunk_retention", lambda i: {}),
}


def cuda_inputs(name: str, problem) -> dict:
    """A problem's layer inputs on the GPU. RetNet's per-head decays are set to fla's own, because fla's
    retention fixes them itself."""
    if name == "retnet":
        return {n: torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(16.0))).cuda() for n in problem.inputs}
    return {n: x.cuda() for n, x in problem.inputs.items()}


def copy_bandwidth() -> float:
    x = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x))
    return 2 * x.numel() / (ms * 1e-3)  # bytes read + written per second


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", nargs="*", default=None, help="layer names to run")
    args = parser.parse_args()
    log = open(args.out, "a") if args.out else None

    def say(text: str) -> None:
        print(text, flush=True)
        if log:
            log.write(text + "\n")
            log.flush()

    bandwidth = copy_bandwidth()
    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16 forward; "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    say(f"{'layer':18s} {'shape':22s} {'ours (ms)':>10s} {'fla (ms)':>10s} {'fla/ours':>9s} {'Mtok/s':>8s} "
        f"{'floor/ours':>11s} {'gap':>8s} {'first call s (ours / fla)':>26s}")
    delta_rule_ms = {}
    for name, entry in PEERS.items():
        if args.only and name not in args.only:
            continue
        # The generated Triton forward itself (chunk_<name> routes to it only where it is known to be fast).
        ours = getattr(importlib.import_module(f"generated.{name}.chunk_triton"), f"chunk_{name}_triton")
        peer, kwargs = None, None
        if entry is not None:
            module_name, function, kwargs = entry
            peer = getattr(importlib.import_module(module_name), function)
        checks = LayerChecks(ROOT / "specs" / f"{name}.yaml", None, None)
        for B, T in ((8, 2048), (2, 8192)):
            p = checks.problem(T, 128, 128, B=B, H=16).to(torch.bfloat16)
            q, k, v = (x.cuda() for x in p.args()[:3])
            inputs = cuda_inputs(name, p)
            with torch.no_grad():
                first_ours = first_call_seconds(lambda: ours(q, k, v, *inputs.values()))
                first_peer = first_call_seconds(lambda: peer(q, k, v, **kwargs(inputs))) if peer else float("nan")
                t_ours = triton.testing.do_bench(lambda: ours(q, k, v, *inputs.values()))
                t_peer = triton.testing.do_bench(lambda: peer(q, k, v, **kwargs(inputs))) if peer else float("nan")
                # The two must compute the same layer for the times to compare: their largest output gap,
                # relative to the largest output.
                o_ours = ours(q, k, v, *inputs.values())[0].float()
                gap = ((peer(q, k, v, **kwargs(inputs))[0].float() - o_ours).abs().max() / o_ours.abs().max()).item() \
                    if peer else float("nan")
            floor = 2 * (2 * q.numel() + k.numel() + v.numel()) / bandwidth * 1e3  # bf16 q, k, v read, o written
            if name == "delta_rule":
                delta_rule_ms[B] = t_ours
            note = ""
            if name in ("longhorn", "delta_product") and B in delta_rule_ms:
                # The yardstick for the layers beyond the delta rule: our delta_rule at the same shape.
                note = f"   {t_ours / delta_rule_ms[B]:.2f}x our delta_rule"
            say(f"{name:18s} {f'B={B} T={T} H=16 K=V=128':22s} {t_ours:10.4f} {t_peer:10.4f} {t_peer / t_ours:8.2f}x "
                f"{B * T / t_ours / 1e3:8.1f} {floor / t_ours:10.2f} {gap:8.1e} {first_ours:12.2f} / {first_peer:6.2f}{note}")


if __name__ == "__main__":
    main()
