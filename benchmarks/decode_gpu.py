"""Decoding with a carried state on the GPU: generated fused recurrent kernels against fla's.

    python benchmarks/decode_gpu.py [--out log.txt]

Times one step (T = 1, B = 32) and a 2048-token sequential run (B = 8) at H = 16, K = V = 128 in bf16
with `triton.testing.do_bench`, for each layer that fla also has as a fused recurrent kernel, and
prints milliseconds and the ratio fla / ours (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ttr_codegen.testing import LayerChecks  # noqa: E402

PEERS = {  # layer -> (fla module, function, how our inputs map to its keyword arguments)
    "simple_gla": ("fla.ops.simple_gla", "fused_recurrent_simple_gla", lambda i: {"g": i["g"]}),
    "gla": ("fla.ops.gla", "fused_recurrent_gla", lambda i: {"gk": i["g"]}),
    "delta_rule": ("fla.ops.delta_rule", "fused_recurrent_delta_rule", lambda i: {"beta": i["beta"]}),
    "gated_delta_rule": ("fla.ops.gated_delta_rule", "fused_recurrent_gated_delta_rule",
                         lambda i: {"g": i["g"], "beta": i["beta"]}),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    log = open(args.out, "a") if args.out else None

    def say(text: str) -> None:
        print(text, flush=True)
        if log:
            log.write(text + "\n")
            log.flush()

    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16, "
        "H=16 K=V=128, state fp32; do_bench median ms")
    say(f"{'layer':18s} {'shape':14s} {'ours (ms)':>10s} {'fla (ms)':>10s} {'fla/ours':>9s}   ours by block_v")
    for name, (module_name, function, kwargs) in PEERS.items():
        ours = getattr(importlib.import_module(f"generated.{name}"), f"fused_recurrent_{name}")
        peer = getattr(importlib.import_module(module_name), function)
        checks = LayerChecks(ROOT / "specs" / f"{name}.yaml", None, None)
        for B, T in ((32, 1), (8, 2048)):
            p = checks.problem(T, 128, 128, B=B, H=16).to(torch.bfloat16)
            q, k, v = (x.cuda() for x in p.args()[:3])
            inputs = {n: x.cuda() for n, x in p.inputs.items()}
            state = torch.randn(B, 16, 128, 128, device="cuda") * 0.01
            t_ours = triton.testing.do_bench(lambda: ours(q, k, v, *inputs.values(), initial_state=state,
                                                          output_final_state=True))
            t_peer = triton.testing.do_bench(lambda: peer(q, k, v, **kwargs(inputs), initial_state=state,
                                                          output_final_state=True))
            sweep = {bv: triton.testing.do_bench(lambda bv=bv: ours(q, k, v, *inputs.values(), initial_state=state,
                                                                    output_final_state=True, block_v=bv))
                     for bv in (8, 16, 32, 64)}
            say(f"{name:18s} {f'B={B} T={T}':14s} {t_ours:10.4f} {t_peer:10.4f} {t_peer / t_ours:8.2f}x   "
                + " ".join(f"{bv}:{t:.4f}" for bv, t in sweep.items()))


if __name__ == "__main__":
    main()
