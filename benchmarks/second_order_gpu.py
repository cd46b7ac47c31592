"""MesaNet by conjugate gradients (specs/mesa_cg.yaml) on the GPU against fla-core's `chunk_mesa_net` (the same
30 steps), and the other second-order layers for the record (mesa exact, rls, and the affine memory: exact and
by conjugate gradients; the issue's goal for rls and the affine memory is 2x mesa's time).

    python benchmarks/second_order_gpu.py [--out log.txt] [--layers mesa_cg mesa rls affine_mesa affine_mesa_cg]
                                          [--shapes 4x2048 2x8192] [--cg-warps 4 8]
                                          [--launch gradient:16x1 scan:8x1] [--profile mesa_cg]

H=16, K=V=64, bf16 inputs (our chunked forms compute in float32); `triton.testing.do_bench` median ms of the
forward and of forward+backward, the ratio fla / ours (> 1: ours is faster) and the largest gap to fla relative
to the largest value, of the output and (fwd+bwd rows) of every input's gradient. fla guards its step ratios
with + 1e-5, which damps its late steps at unit scale (docs/fla_layers.md): gaps of ~1e-3 are that, not an error.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from delta_family_gpu import gap, outputs, teller, timed  # noqa: E402  (this folder is on sys.path when a script here runs)
from ttr_codegen.testing import rls_kernel_settings  # noqa: E402


def inputs(B: int, T: int, H: int = 16, D: int = 64) -> list[torch.Tensor]:
    """q, k (unit keys, as MesaNet normalises them), v, the log-decay g, the weight beta, the ridge lamb."""
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=generator)

    q = F.normalize(randn(B, T, H, D), dim=-1).to(torch.bfloat16)
    k = F.normalize(randn(B, T, H, D), dim=-1).to(torch.bfloat16)
    v = randn(B, T, H, D).to(torch.bfloat16)
    g = F.logsigmoid(randn(B, T, H) + 4)
    beta = torch.sigmoid(randn(B, T, H))
    lamb = 0.25 + torch.rand(H, D, device="cuda", generator=generator)
    return [q, k, v, g, beta, lamb]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--layers", nargs="*", default=["mesa_cg", "mesa", "rls", "affine_mesa_cg", "affine_mesa"])
    parser.add_argument("--shapes", nargs="*", default=["4x2048", "2x8192"])
    parser.add_argument("--cg-warps", nargs="*", type=int, default=[],
                        help="also time the conjugate-gradient layers' forward with the steps kernel at these warps")
    parser.add_argument("--cg-precisions", nargs="*", default=[],
                        help="and the steps' products in these precisions (tf32x3, tf32); gap: to float32 inputs'")
    parser.add_argument("--launch", nargs="*", default=[],
                        help="also time them with one entry of cg_triton.LAUNCH changed, as KERNELS:WARPSxSTAGES "
                             "(scan:8x1 the walk over the chunks, gradient:16x1 the gradient kernel, cg:8x1 the steps "
                             "and the moments' increments)")
    parser.add_argument("--no-peer", action="store_true", help="leave fla's rows out")
    parser.add_argument("--rls-algorithms", nargs="*", default=[],
                        help="time rls with each of these FORWARD:BACKWARD[:GAINS[:CHUNK[:PRODUCTS[:LOOPS]]]] of its "
                             "kernels (rls_triton's settings: chunks or tokens each way, gains by rows, columns or "
                             "warps, the chunks' tokens and products, the gains' loops unrolled or running, e.g. "
                             "chunks:tokens or chunks:chunks:warps:16:tf32x3:running; default: the module's own)")
    parser.add_argument("--profile", nargs="*", default=[],
                        help="then these layers' kernels by GPU time (torch.profiler), forward and forward+backward")
    args = parser.parse_args()
    say = teller(args.out)

    chunk_mesa_net = None
    try:
        if not args.no_peer:
            from fla.ops.mesa_net import chunk_mesa_net
    except ImportError as error:  # the rows of our own layers still print
        say(f"fla-core not importable ({error}): no peer rows")
    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 inputs, H=16 K=V=64")
    say(f"{'layer':14s} {'shape':>8s} {'pass':>8s} {'ours ms':>9s} {'fla ms':>8s} {'fla/ours':>9s} {'gap':>9s} "
        f"{'first call s':>12s}")
    for shape in args.shapes:
        B, T = (int(x) for x in shape.split("x"))
        for name in args.layers:
            module = __import__(f"generated.{name}", fromlist=[f"chunk_{name}"])
            ours = getattr(module, f"chunk_{name}")
            leaves = inputs(B, T)
            if name == "rls":  # one log-decay, no weight or ridge input
                leaves = leaves[:4]
            d_out = torch.randn_like(leaves[2])
            algorithms = args.rls_algorithms if name == "rls" and args.rls_algorithms else [None]
            for algorithm, backward in itertools.product(algorithms, (False, True)):
                if algorithm is not None:
                    vars(importlib.import_module("generated.rls.rls_triton")).update(rls_kernel_settings(algorithm))
                grads = [x.detach().requires_grad_(backward) for x in leaves]

                def run_ours(grads=grads):
                    return ours(*grads)
                start = time.perf_counter()
                found = outputs(run_ours, backward, grads, d_out)
                torch.cuda.synchronize()
                first = time.perf_counter() - start
                ours_ms = timed(run_ours, backward, grads, d_out)
                fla_ms, gap_text = float("nan"), "-"
                if chunk_mesa_net is not None and name == "mesa_cg":
                    q, k, v, g, beta, lamb = grads

                    def run_fla():
                        return chunk_mesa_net(q, k, v, g, beta, lamb, max_CG_iteration=30)
                    reference = outputs(run_fla, backward, grads, d_out)
                    fla_ms = timed(run_fla, backward, grads, d_out)
                    gap_text = f"{gap(found, reference):.2e}"
                label = name if algorithm is None else f"{name} {algorithm}"
                say(f"{label:14s} {shape:>8s} {'fwd+bwd' if backward else 'fwd':>8s} {ours_ms:9.3f} {fla_ms:8.3f} "
                    f"{fla_ms / ours_ms:9.2f} {gap_text:>9s} {first:12.1f}")
            if name.endswith("_cg") and (args.cg_warps or args.cg_precisions):  # the steps kernel's settings
                cg_triton = importlib.import_module(f"generated.{name}.cg_triton")
                launch, chosen = cg_triton.LAUNCH["cg"], cg_triton.precision
                default = launch["num_warps"]
                exact = outputs(lambda: ours(*[x.detach().float() for x in leaves]), False, leaves, d_out)  # tf32x3
                for warps in args.cg_warps or [default]:
                    for precision in args.cg_precisions or [chosen(torch.bfloat16)]:
                        launch["num_warps"] = warps
                        cg_triton.precision = lambda dtype, precision=precision: precision
                        for backward in (False, True):
                            grads = [x.detach().requires_grad_(backward) for x in leaves]
                            found = outputs(lambda: ours(*grads), backward, grads, d_out)
                            what = f"w{warps} {precision}{' +bwd' if backward else ''}"
                            say(f"{name:14s} {shape:>8s} {what:>8s} "
                                f"{timed(lambda: ours(*grads), backward, grads, d_out):9.3f} {'':8s} {'':9s} "
                                f"{gap(found[:1], exact[:1]):9.2e}")
                launch["num_warps"], cg_triton.precision = default, chosen
            if name.endswith("_cg") and args.launch:  # one launch entry's warps and pipeline stages
                table = importlib.import_module(f"generated.{name}.cg_triton").LAUNCH
                as_set = {backward: outputs(lambda: ours(*grads), backward, grads, d_out)
                          for backward in (False, True)
                          for grads in [[x.detach().requires_grad_(backward) for x in leaves]]}
                for entry in args.launch:
                    kernels, setting = entry.split(":")
                    default = dict(table[kernels])
                    table[kernels].update(zip(("num_warps", "num_stages"), (int(x) for x in setting.split("x"))))
                    for backward in (False, True):
                        grads = [x.detach().requires_grad_(backward) for x in leaves]
                        found = outputs(lambda: ours(*grads), backward, grads, d_out)
                        what = f"{entry}{' +bwd' if backward else ''}"
                        say(f"{name:14s} {shape:>8s} {what:>8s} "  # gap: to the table as set
                            f"{timed(lambda: ours(*grads), backward, grads, d_out):9.3f} {'':8s} {'':9s} "
                            f"{gap(found, as_set[backward]):9.2e}")
                    table[kernels].update(default)
    B, T = (int(x) for x in args.shapes[0].split("x"))
    for name in args.profile:
        profile_layer(name, B, T, say)


def profile_layer(name: str, B: int, T: int, say) -> None:
    """Where a layer's forward and training step spend their GPU time, kernel by kernel (the ten largest)."""
    ours = getattr(importlib.import_module(f"generated.{name}"), f"chunk_{name}")
    leaves = inputs(B, T)[:4] if name == "rls" else inputs(B, T)
    profile_call(f"{name} {B}x{T}", ours, leaves, torch.randn_like(leaves[2]), say)


def profile_call(label: str, run, leaves: list[torch.Tensor], d_out: torch.Tensor, say) -> None:
    """run(*leaves)'s forward and training step: GPU time kernel by kernel (the ten largest) against the host's
    time to issue a call."""
    from torch.profiler import ProfilerActivity, profile

    for backward in (False, True):
        grads = [x.detach().requires_grad_(backward) for x in leaves]
        outputs(lambda: run(*grads), backward, grads, d_out)  # compiled before the profile
        with profile(activities=[ProfilerActivity.CUDA]) as trace:
            outputs(lambda: run(*grads), backward, grads, d_out)
            torch.cuda.synchronize()
        gpu_ms = sum(event.self_device_time_total for event in trace.key_averages()) / 1e3
        host_ms, finished_ms = _host_time(lambda: timed_step(lambda: run(*grads), backward, grads, d_out))
        say(f"{label} {'fwd+bwd' if backward else 'fwd'}: GPU time {gpu_ms:.3f} ms; the host issues a call "
            f"in {host_ms:.3f} ms, which finishes in {finished_ms:.3f} (host-bound where these two are above the "
            f"GPU's):")
        say(trace.key_averages().table(sort_by="device_time_total", row_limit=10, max_name_column_width=60))


def timed_step(run, backward: bool, leaves: list[torch.Tensor], d_out: torch.Tensor) -> None:
    """What `timed` times: the forward without gradients, or the forward and the gradients."""
    with torch.set_grad_enabled(backward):
        o = run()[0]
        if backward:
            torch.autograd.grad(o, leaves, d_out)


def _host_time(call, calls: int = 10) -> tuple[float, float]:
    """(ms the host takes to issue a call, ms per call until the GPU is done), over a few calls few enough that
    the launch queue never fills (a full queue would make the host wait on the GPU)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    return 1e3 * (issued - start) / calls, 1e3 * (time.perf_counter() - start) / calls


if __name__ == "__main__":
    main()
