"""Where the host's time goes when a layer's call is host-bound (the host takes longer to issue a call than the
GPU to run it, so `do_bench` times the host): each layer's forward and training step issued without waiting
(ms per call; with custom ops, also called through PyTorch's dispatcher instead of their eager twins), then a
cProfile of the training step, its functions by own time, and the time per call of Triton's launches, of
PyTorch's custom-op and autograd machinery and of our own code.

    python benchmarks/host_overhead_gpu.py [--layers mesa_cg ttt_linear] [--shape 4x2048] [--top 25]

bf16, H = 16, K = V = 64, the inputs of second_order_gpu.py and online_gpu.py.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import pstats
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from second_order_gpu import _host_time, timed_step  # noqa: E402  (this folder is on sys.path when a script here runs)


def peer_for(name: str):
    """fla's op for the layer, called as the other benchmarks call it (None where there is none)."""
    try:
        if name == "mesa_cg":
            from fla.ops.mesa_net import chunk_mesa_net
            return lambda q, k, v, g, beta, lamb: chunk_mesa_net(q, k, v, g, beta, lamb, max_CG_iteration=30)
        if name == "gated_delta_rule":
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule
            return lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta)
        if name == "ttt_linear":
            from fla.ops.ttt import chunk_ttt_linear
            return lambda q, k, v, w, b, eta: chunk_ttt_linear(q, k, v, w.to(k.dtype), b.to(k.dtype),
                                                               eta[..., None].to(k.dtype), chunk_size=16)
    except ImportError:
        pass
    return None


@contextlib.contextmanager
def through_dispatcher(name: str):
    """The layer's custom ops called as ops (through PyTorch's dispatcher) instead of their eager twins."""
    patched = []
    for module in ("chunk_triton", "cg_triton", "rls_triton", "flash_triton"):
        try:
            kernels = importlib.import_module(f"generated.{name}.{module}")
        except ImportError:
            continue
        for attribute in dir(kernels):
            if attribute.endswith("_apply") and hasattr(kernels, attribute[:-len("_apply")] + "_op"):
                patched.append((kernels, attribute, getattr(kernels, attribute)))
                setattr(kernels, attribute, getattr(kernels, attribute[:-len("_apply")] + "_op"))
    try:
        yield bool(patched)
    finally:
        for kernels, attribute, twin in patched:
            setattr(kernels, attribute, twin)


# Layers that take second_order_gpu.py's inputs (q, k, v, g, beta, lamb: unit keys, gates near 1), as many of them
# as each reads.
SECOND_ORDER_INPUTS = {"mesa_cg": 6, "affine_mesa_cg": 6, "mesa": 6, "affine_mesa": 6, "rls": 4, "gated_delta_rule": 5}


def leaves_for(name: str, B: int, T: int) -> list[torch.Tensor]:
    if name in SECOND_ORDER_INPUTS:
        from second_order_gpu import inputs
        return inputs(B, T)[:SECOND_ORDER_INPUTS[name]]
    from online_gpu import inputs
    from ttr_codegen.spec import load_spec
    return inputs(load_spec(ROOT / "specs" / f"{name}.yaml"), B, T)


# Where a function's own time is counted: by the file it lives in.
GROUPS = (("triton launch", ("/triton/",)), ("torch custom ops", ("torch/_library", "torch/_ops", "_dynamo")),
          ("torch autograd", ("torch/autograd",)), ("our code", ("/generated/",)))


def grouped(stats: pstats.Stats, calls: int) -> dict[str, float]:
    """ms per call of own time, by group; the rest (built-ins: tensor ops, their launches) under "other"."""
    totals = {name: 0.0 for name, _ in GROUPS} | {"other (torch ops, built-ins)": 0.0}
    for (path, _, _), (_, _, own, _, _) in stats.stats.items():
        group = next((name for name, marks in GROUPS if any(m in path for m in marks)), "other (torch ops, built-ins)")
        totals[group] += 1e3 * own / calls
    return totals


def report(label: str, step) -> None:
    """Warm step up, then print the host's time to issue it and the time until the GPU is done (ms per call)."""
    for _ in range(3):
        step()
    host, finished = _host_time(step)
    print(f"{label}: the host issues a call in {host:.3f} ms, done in {finished:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", nargs="*", default=["mesa_cg", "ttt_linear"])
    parser.add_argument("--shape", default="4x2048")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--no-peer", action="store_true", help="leave fla's rows out")
    args = parser.parse_args()
    B, T = (int(x) for x in args.shape.split("x"))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, B={B} T={T} H=16 K=V=64")
    for name in args.layers:
        ours = getattr(importlib.import_module(f"generated.{name}"), f"chunk_{name}")
        leaves = leaves_for(name, B, T)
        d_out = torch.randn_like(leaves[2])
        peer = None if args.no_peer else peer_for(name)
        for who, run in (("fla", peer), ("ours", ours)):
            for backward in (False, True) if run else ():
                grads = [x.detach().requires_grad_(backward) for x in leaves]

                def step(run=run, grads=grads, backward=backward):
                    timed_step(lambda: run(*grads), backward, grads, d_out)
                label = f"{who} {name} {'fwd+bwd' if backward else 'fwd'}"
                if who == "fla":
                    report(label, step)
                    continue
                for _ in range(2):  # twice, alternating: the first call's order is no factor
                    report(label, step)
                    with through_dispatcher(name) as has_ops:
                        if has_ops:
                            report(f"{label}, the custom ops through the dispatcher", step)
                if backward:
                    profile(step, args.calls, args.top)


def profile(step, calls: int, top: int) -> None:
    """cProfile of `calls` calls of step: own time by group, then the `top` functions."""
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler)
    for group, ms in grouped(stats, calls).items():
        print(f"  {group:32s} {ms:7.3f} ms a call (own time, under cProfile)")
    stats.sort_stats("tottime").print_stats(top)


if __name__ == "__main__":
    main()
