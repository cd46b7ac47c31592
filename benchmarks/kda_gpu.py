"""KDA (specs/kda.yaml: a per-key decay, then a delta step) on the GPU against fla-core's `chunk_kda`, bf16.

    python benchmarks/kda_gpu.py [--out log.txt]

Shapes B=8 T=2048 and B=2 T=8192, H=16, K=V=128; `triton.testing.do_bench` median ms of the forward and of
forward+backward for our chunked form (`chunk_kda`, PyTorch: the Triton kernels do not cover this structure
yet), our fused recurrent forward, and fla's chunked kernels; the ratio fla / ours (> 1: ours is faster) and
the largest output gap to fla relative to the largest output (both must compute the same layer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fla.ops.kda import chunk_kda as fla_chunk_kda  # noqa: E402

from generated.kda import chunk_kda  # noqa: E402
from generated.kda.fused_recurrent import fused_recurrent_kda  # noqa: E402


def inputs(B: int, T: int, H: int = 16, D: int = 128) -> list[torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=generator)

    q, k = (F.normalize(randn(B, T, H, D), dim=-1) for _ in range(2))
    v = randn(B, T, H, D)
    g = F.logsigmoid(randn(B, T, H, D) + 4)  # per-key log-decays, mostly near 0 as in trained models
    beta = torch.sigmoid(randn(B, T, H))
    return [x.to(torch.bfloat16) for x in (q, k, v, g, beta)]


def timed(run, backward: bool, leaves: list[torch.Tensor]) -> float:
    if not backward:
        with torch.no_grad():
            return triton.testing.do_bench(run)
    d_out = torch.randn_like(run()[0])

    def step():
        o = run()[0]
        torch.autograd.grad(o, leaves, d_out)
    return triton.testing.do_bench(step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    log = open(args.out, "a") if args.out else None

    def say(text: str) -> None:
        print(text, flush=True)
        if log:
            log.write(text + "\n")

    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16, H=16 K=V=128")
    say(f"{'op':34s} {'shape':14s} {'ours (ms)':>10s} {'fla (ms)':>10s} {'fla/ours':>9s} {'gap':>8s}")
    for B, T in ((8, 2048), (2, 8192)):
        leaves = [x.requires_grad_(True) for x in inputs(B, T)]
        q, k, v, g, beta = leaves
        ours = {"chunk_kda (PyTorch)": lambda: chunk_kda(q, k, v, g, beta),
                "fused_recurrent_kda (Triton)": lambda: fused_recurrent_kda(q, k, v, g, beta)}
        peer = lambda: fla_chunk_kda(q, k, v, g, beta)  # noqa: E731
        with torch.no_grad():
            reference = peer()[0].float()
        for backward in (False, True):
            t_peer = timed(peer, backward, leaves)
            for name, run in ours.items():
                if backward and name.startswith("fused"):
                    continue  # a decoding kernel: no backward
                with torch.no_grad():
                    o = run()[0].float()
                gap = ((o - reference).abs().max() / reference.abs().max()).item()
                t_ours = timed(run, backward, leaves)
                what = f"{name} {'fwd+bwd' if backward else 'fwd'}"
                say(f"{what:34s} {f'B={B} T={T}':14s} {t_ours:10.3f} {t_peer:10.3f} {t_peer / t_ours:8.2f}x {gap:8.1e}")


if __name__ == "__main__":
    main()
