"""The nonlinear memories on the GPU (online_triton.py: one program per sequence and head walks the mini-batches
with the fast weights in registers; training adds checkpoints and a backward kernel walking them in reverse)
against fla-core's `chunk_ttt_linear` for ttt_linear, and against our own PyTorch dual form (chunk.py's loop
over mini-batches) for every layer: the forward without gradients (as the kernels choose, then with the
read-out forced into the walk over mini-batches and apart from it: `online_triton.read_out_apart`), then
forward+backward.

    python benchmarks/online_gpu.py [--out log.txt] [--layers ttt_linear ttt_mlp titans_mlp] [--shapes 4x2048 2x8192]

H=16, K=V=64, bf16 inputs (our kernels compute in float32), mini-batches of 16 tokens;
`triton.testing.do_bench` median ms; TFLOP/s counts the dual form's matrix products of the forward (2 FLOPs
per multiply-add; `dual_form_flops`); gap: the largest difference from the reference relative to its largest
value, of the output (and of every input's gradient on fwd+bwd rows), against fla for ttt_linear and the
PyTorch dual form in float32 otherwise. A layer whose state is too large for the training kernel
(`online_triton.MAX_TRAINING_STATE`: more than ttt_mlp's at K = 64) trains on the PyTorch form on both sides of
its row.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from delta_family_gpu import gap, outputs, teller, timed  # noqa: E402  (this folder is on sys.path when a script here runs)
from second_order_gpu import profile_call  # noqa: E402
from ttr_codegen.spec import load_spec  # noqa: E402
from ttr_codegen.testing import OnlineChecks, online_kernels_forced  # noqa: E402


def dual_form_flops(spec, B: int, T: int, H: int, K: int) -> float:
    """The matrix products of one call: per mini-batch of n rows and layer (a inputs, c outputs), the key
    rows' forward (n a c), the gradient passed to the layer below (n c a, but the first layer), the query
    rows at the start weights (n a c, twice with momentum), their scores with the key rows (n n a), the
    gradients mixed in (n n c, twice with a bias), and the weights' update (a n c, twice with momentum)."""
    r, o = spec.regressor, spec.optimiser
    n, widths = o.batch_size, [K] + [(r.hidden or 1) * K] * (r.depth - 1) + [K]
    momentum = 2 if o.momentum else 1
    per_batch = 0
    for layer, (a, c) in enumerate(zip(widths[:-1], widths[1:])):
        per_batch += n * a * c * (1 + (layer > 0) + momentum + momentum) + n * n * a + n * n * c * (2 if r.bias else 1)
    return 2.0 * per_batch * (T / n) * B * H


def inputs(spec, B: int, T: int, H: int = 16, D: int = 64) -> list[torch.Tensor]:
    """q, k (unit rows), v, then the spec's inputs at values where every memory stays bounded and alive over
    8192 tokens: rates in (0, 0.1), momenta in (0, 0.5), forget fractions in (0, 0.001), layer norm weights
    near 1 and biases near 0 (Titans' memory diverges with momenta in (0.5, 1), and forgets itself to zero
    with fractions in (0, 0.01): a network's gradients vanish with its weights)."""
    generator = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.rand(*shape, device="cuda", generator=generator)

    q = F.normalize(torch.randn(B, T, H, D, device="cuda", generator=generator), dim=-1).to(torch.bfloat16)
    k = F.normalize(torch.randn(B, T, H, D, device="cuda", generator=generator), dim=-1).to(torch.bfloat16)
    v = torch.randn(B, T, H, D, device="cuda", generator=generator).to(torch.bfloat16)
    typical = {"step_size": lambda: 0.1 * rand(B, T, H), "momentum": lambda: 0.5 * rand(B, T, H),
               "forget": lambda: 0.001 * rand(B, T, H), "norm_weight": lambda: 1 + 0.1 * (rand(H, D) - 0.5),
               "norm_bias": lambda: 0.1 * (rand(H, D) - 0.5)}
    return [q, k, v, *(typical[i.role]() for i in spec.inputs)]


def start_weights(name: str, B: int, H: int = 16, D: int = 64) -> tuple[torch.Tensor, ...] | None:
    """A multi-layer memory's starting weights (and momenta), drawn as the tests draw them, float32: at zero
    weights its gradients vanish, so its layer refuses to start there. None for a one-layer memory (fla's start)."""
    checks = OnlineChecks(ROOT / "specs" / f"{name}.yaml", None, None, None)
    if checks.spec.regressor.depth == 1:
        return None
    return tuple(x.float().cuda() for x in checks.problem(1, D, B=B, H=H)[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--layers", nargs="*", default=["ttt_linear", "ttt_mlp", "titans_mlp"])
    parser.add_argument("--shapes", nargs="*", default=["4x2048", "2x8192"])
    parser.add_argument("--state-dots", nargs="*", default=[],
                        help="also time the forward with the products that make the carried state at these "
                             "precisions (tf32, tf32x3; the kernels' choice: tf32x3); gap: to the kernels' choice")
    parser.add_argument("--stages", nargs="*", type=int, default=[],
                        help="also time the forward with these pipeline stages (the kernels' choice: 1)")
    parser.add_argument("--warps", nargs="*", type=int, default=[],
                        help="also time the forward with these warps (the kernels' choice: online_triton._warps)")
    parser.add_argument("--no-peer", action="store_true", help="leave the peer rows out")
    parser.add_argument("--profile", action="store_true",
                        help="then each layer's kernels (and the peer's) by GPU time against the host's time per call")
    args = parser.parse_args()
    say = teller(args.out)

    try:
        from fla.ops.ttt import chunk_ttt_linear as fla_ttt_linear
    except ImportError as error:
        fla_ttt_linear = None
        say(f"fla-core not importable ({error}): no peer rows")
    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16 inputs, "
        "H=16 K=V=64")
    say(f"{'layer':12s} {'shape':>8s} {'pass':>9s} {'ours ms':>9s} {'TFLOP/s':>8s} {'peer':>11s} {'peer ms':>9s} "
        f"{'peer/ours':>9s} {'gap':>9s} {'first call s':>12s}")
    for shape in args.shapes:
        B, T = (int(x) for x in shape.split("x"))
        for name in args.layers:
            spec = load_spec(ROOT / "specs" / f"{name}.yaml")
            chunk_module = importlib.import_module(f"generated.{name}.chunk")
            ours = functools.partial(getattr(chunk_module, f"chunk_{name}"), initial_state=start_weights(name, B))
            leaves = inputs(spec, B, T)
            d_out = torch.randn_like(leaves[2])
            if args.no_peer:
                peer_name, peer = "none", None
            elif name == "ttt_linear" and fla_ttt_linear is not None:
                peer_name = "fla"

                def peer(q, k, v, ln_weight, ln_bias, eta):
                    # fla's kernels multiply eta and the norm's parameters into tiles of k's dtype: theirs in it
                    return fla_ttt_linear(q, k, v, ln_weight.to(k.dtype), ln_bias.to(k.dtype),
                                          eta[..., None].to(k.dtype), chunk_size=16)
            else:  # our own PyTorch dual form (chunk.py without its kernels), in float32
                peer_name = "torch dual"

                def peer(*tensors):
                    kernel, chunk_module._in_triton = chunk_module._in_triton, lambda q, v, training: False
                    try:
                        return ours(*(x.float() for x in tensors))
                    finally:
                        chunk_module._in_triton = kernel
            # The forward as the kernels choose, then with its read-out forced into the walk and apart from it.
            for backward, apart in ((False, None), (False, False), (False, True), (True, None)):
                grads = [x.detach().requires_grad_(backward) for x in leaves]
                with contextlib.nullcontext() if apart is None else online_kernels_forced(chunk_module, apart):
                    start = time.perf_counter()
                    found = outputs(lambda: ours(*grads), backward, grads, d_out)
                    torch.cuda.synchronize()
                    first = time.perf_counter() - start
                    ours_ms = timed(lambda: ours(*grads), backward, grads, d_out)
                if apart is None and peer is None:
                    reference, peer_ms = found, float("nan")
                elif apart is None:  # the peer once per pass
                    try:
                        reference = outputs(lambda: peer(*grads), backward, grads, d_out)
                        peer_ms = timed(lambda: peer(*grads), backward, grads, d_out)
                    except Exception as error:  # our row still counts when the peer cannot run it
                        say(f"{name} {shape}: {peer_name} failed: {type(error).__name__}: {str(error)[:200]}")
                        reference, peer_ms = found, float("nan")
                flops = dual_form_flops(spec, B, T, 16, 64) / ours_ms / 1e9 if not backward else float("nan")
                label = "fwd+bwd" if backward else {None: "fwd", False: "fwd walk", True: "fwd apart"}[apart]
                say(f"{name:12s} {shape:>8s} {label:>9s} {ours_ms:9.3f} {flops:8.2f} "
                    f"{peer_name:>11s} {peer_ms:9.3f} {peer_ms / ours_ms:9.2f} {gap(found, reference):9.2e} "
                    f"{first:12.1f}")
                if apart is None and not backward:
                    chosen = found
            for label, override in ([(f"fwd {d}", {"STATE_DOT": d}) for d in args.state_dots]
                                    + [(f"fwd s{n}", {"num_stages": n}) for n in args.stages]
                                    + [(f"fwd w{n}", {"num_warps": n}) for n in args.warps]):
                say(_with_sizes(name, shape, label, override, ours, leaves, chosen, d_out))
            if args.profile:
                profile_call(f"{name} {shape} ours", ours, leaves, d_out, say)
                if peer is not None:
                    profile_call(f"{name} {shape} {peer_name}", peer, leaves, d_out, say)


def _with_sizes(name: str, shape: str, label: str, override: dict, ours, leaves, chosen, d_out) -> str:
    """The forward's row with some of the kernels' static arguments overridden (online_triton._sizes patched);
    gap: to the kernels' own choice."""
    kernels = importlib.import_module(f"generated.{name}.online_triton")
    sizes = kernels._sizes

    def patched(*args, **kwargs):
        return {**sizes(*args, **kwargs), **override}
    kernels._sizes = patched
    try:
        found = outputs(lambda: ours(*leaves), False, leaves, d_out)
        ours_ms = timed(lambda: ours(*leaves), False, leaves, d_out)
    finally:
        kernels._sizes = sizes
    return f"{name:12s} {shape:>8s} {label:>9s} {ours_ms:9.3f} {'':8s} {'':>11s} {'':9s} {'':9s} " \
           f"{gap(found, chosen):9.2e}"


if __name__ == "__main__":
    main()
