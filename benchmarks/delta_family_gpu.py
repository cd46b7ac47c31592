"""KDA (specs/kda.yaml: a per-key decay, then a delta step) and gated DeltaProduct (specs/gated_delta_product.yaml:
a scalar decay, then two delta steps per token) on the GPU against fla-core's `chunk_kda` and
`chunk_gated_delta_product`, bf16.

    python benchmarks/delta_family_gpu.py [--out log.txt] [--layers kda] [--chunked-only]

Shapes B=8 T=2048 and B=2 T=8192, H=16, K=V=128; `triton.testing.do_bench` median ms of the forward and of
forward+backward for our chunked form (`chunk_<name>`, which runs the generated Triton kernels on CUDA), our
fused recurrent forward, and fla's chunked kernels; the ratio fla / ours (> 1: ours is faster) and the largest
gap to fla relative to the largest value, of the output and (fwd+bwd rows) of every input's gradient.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fla.ops.gated_delta_product import chunk_gated_delta_product as fla_chunk_gated_delta_product  # noqa: E402
from fla.ops.kda import chunk_kda as fla_chunk_kda  # noqa: E402

from generated.gated_delta_product import chunk_gated_delta_product  # noqa: E402
from generated.gated_delta_product.fused_recurrent import fused_recurrent_gated_delta_product  # noqa: E402
from generated.kda import chunk_kda  # noqa: E402
from generated.kda.fused_recurrent import fused_recurrent_kda  # noqa: E402


def inputs(B: int, T: int, steps: int = 1, per_key: bool = True, H: int = 16, D: int = 128) -> list[torch.Tensor]:
    """q, k, v, the log-decay g and the step beta; k, v and beta per sub-step (T * steps rows)."""
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=generator)

    q = F.normalize(randn(B, T, H, D), dim=-1)
    k = F.normalize(randn(B, T * steps, H, D), dim=-1)
    v = randn(B, T * steps, H, D)
    g = F.logsigmoid(randn(B, T, H, *((D,) if per_key else ())) + 4)  # log-decays mostly near 0, as in trained models
    beta = torch.sigmoid(randn(B, T * steps, H))
    return [x.to(torch.bfloat16) for x in (q, k, v, g, beta)]


def teller(out: str | None):
    """A function that prints a line and appends it to the file `out` (when given), flushed at once: a device
    call's time limit may cut a script short."""
    log = open(out, "a") if out else None

    def say(line: str) -> None:
        print(line, flush=True)
        if log:
            print(line, file=log, flush=True)
    return say


def outputs(run, backward: bool, leaves: list[torch.Tensor], d_out: torch.Tensor) -> list[torch.Tensor]:
    """The output, and with backward the gradients of <output, d_out> for every leaf, in float32."""
    with torch.set_grad_enabled(backward):
        o = run()[0]
        grads = torch.autograd.grad(o, leaves, d_out) if backward else ()
    return [x.float() for x in (o, *grads)]


def gap(found: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The largest difference relative to the largest value, over the output and the gradients."""
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(found, reference))


def timed(run, backward: bool, leaves: list[torch.Tensor], d_out: torch.Tensor) -> float:
    if not backward:
        with torch.no_grad():
            return triton.testing.do_bench(run)

    def step():
        torch.autograd.grad(run()[0], leaves, d_out)
    return triton.testing.do_bench(step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--chunked-only", action="store_true", help="leave the fused recurrent (decoding) rows out")
    parser.add_argument("--layers", nargs="*", default=["kda", "gated_delta_product"])
    args = parser.parse_args()
    say = teller(args.out)

    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16, H=16 K=V=128")
    say(f"{'op':44s} {'shape':14s} {'ours (ms)':>10s} {'fla (ms)':>10s} {'fla/ours':>9s} {'gap':>8s}")
    # Every forward row first, then forward+backward (fla's first backward call autotunes for minutes).
    for backward, (B, T), (layer, steps, per_key) in itertools.product(
            (False, True), ((8, 2048), (2, 8192)), (("kda", 1, True), ("gated_delta_product", 2, False))):
        if layer not in args.layers:
            continue
        leaves = [x.requires_grad_(True) for x in inputs(B, T, steps, per_key)]
        q, k, v, g, beta = leaves
        if layer == "kda":
            ours = {"chunk_kda": lambda: chunk_kda(q, k, v, g, beta),
                    "fused_recurrent_kda": lambda: fused_recurrent_kda(q, k, v, g, beta)}
            peer = lambda: fla_chunk_kda(q, k, v, g, beta)  # noqa: E731
        else:
            ours = {"chunk_gated_delta_product": lambda: chunk_gated_delta_product(q, k, v, g, beta),
                    "fused_recurrent_gated_delta_product":
                        lambda: fused_recurrent_gated_delta_product(q, k, v, g, beta)}
            peer = lambda: fla_chunk_gated_delta_product(q, k, v, g, beta, num_householder=steps)  # noqa: E731
        d_out = torch.randn_like(q)
        reference = outputs(peer, backward, leaves, d_out)
        t_peer = timed(peer, backward, leaves, d_out)
        for name, run in ours.items():
            if name.startswith("fused") and (backward or args.chunked_only):
                continue  # a decoding kernel: no backward
            difference = gap(outputs(run, backward, leaves, d_out), reference)
            t_ours = timed(run, backward, leaves, d_out)
            what = f"{name} {'fwd+bwd' if backward else 'fwd'}"
            say(f"{what:44s} {f'B={B} T={T}':14s} {t_ours:10.3f} {t_peer:10.3f} {t_peer / t_ours:8.2f}x "
                f"{difference:8.1e}")


if __name__ == "__main__":
    main()
