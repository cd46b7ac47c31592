"""Whether a two-layer memory's walk runs faster with its weights streamed through the cache than held in
registers (GPU; --check runs both under Triton's interpreter on the CPU and compares their final weights).

The generated walk (`generated/ttt_mlp/online_triton.py`) holds ttt_mlp's 33 088 float32 weights in one
program's registers, which spill. Here a hand-written walk over the same mini-batches keeps them in a float32
buffer of their own and visits the hidden width in blocks of HB columns, twice a mini-batch: the key rows'
forward (z2 summed over the blocks), the layer norm's loss gradient, then each block's backpropagation and
its weights' step, stored back. Both walks are timed alone (no read-out, no checkpoints: the part of a call
that runs one mini-batch after another), bf16, H = 16, K = V = 64, hidden 256, mini-batches of 16.

    python benchmarks/mlp_walk_study.py [--out FILE] [--blocks 32 64 128] [--warps 4 8]
    TRITON_INTERPRET=1 python benchmarks/mlp_walk_study.py --check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from delta_family_gpu import teller  # noqa: E402  (this folder is on sys.path when a script here runs)
from generated.ttt_mlp import online_triton as generated  # noqa: E402

_state_dot = generated._state_dot


@triton.jit
def _gelu(z):
    """GELU (tanh form) of z and the tanh it took."""
    t = 2 * tl.sigmoid(2 * (0.7978845608028654 * z + 0.035677408136300125 * z * z * z)) - 1
    return 0.5 * z * (1 + t), t


@triton.jit
def _gelu_slope(z, t):
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * (0.7978845608028654 + 3 * 0.035677408136300125 * z * z)


@triton.jit
def _streamed_walk(k_ptr, v_ptr, rate_ptr, ln_weight_ptr, ln_bias_ptr, W1, b1, W2, b2, T, H: tl.constexpr,
                   K: tl.constexpr, V: tl.constexpr, HIDDEN: tl.constexpr, BS: tl.constexpr, HB: tl.constexpr,
                   STATE_DOT: tl.constexpr):
    # One program per (sequence, head); its weights, updated in place, in W1 [K, HIDDEN], b1, W2 [HIDDEN, V], b2.
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    i_nh = i_n * H + i_h
    W1 += i_nh * K * HIDDEN
    b1 += i_nh * HIDDEN
    W2 += i_nh * HIDDEN * V
    rk, rv, rj, rows = tl.arange(0, K), tl.arange(0, V), tl.arange(0, HB), tl.arange(0, BS)
    ln_weight = tl.load(ln_weight_ptr + i_h * V + rv).to(tl.float32)[None, :]
    ln_bias = tl.load(ln_bias_ptr + i_h * V + rv).to(tl.float32)[None, :]
    bias2 = tl.load(b2 + i_nh * V + rv)[None, :]
    for start in range(0, T, BS):  # T a multiple of BS here
        at = (i_n * T + start + rows) * H + i_h
        x = tl.load(k_ptr + at[:, None] * K + rk[None, :]).to(tl.float32)
        v = tl.load(v_ptr + at[:, None] * V + rv[None, :]).to(tl.float32)
        step = -tl.load(rate_ptr + (i_n * T + start + BS - 1) * H + i_h).to(tl.float32)  # the last row's rate
        # The key rows' forward, block by block of the hidden width.
        z2 = tl.zeros([BS, V], tl.float32)
        for j in range(0, HIDDEN, HB):
            W1_j = tl.load(W1 + rk[:, None] * HIDDEN + (j + rj)[None, :])
            z1 = _state_dot(x, W1_j, STATE_DOT, True) + tl.load(b1 + j + rj)[None, :]
            hidden, _ = _gelu(z1)
            z2 += _state_dot(hidden, tl.load(W2 + (j + rj)[:, None] * V + rv[None, :]), STATE_DOT, False)
        z2 += bias2
        # The layer norm's loss gradient at z2 (its residual target v - x).
        mean = tl.sum(z2, axis=1)[:, None] / V
        centred = z2 - mean
        inv_std = tl.rsqrt(tl.sum(centred * centred, axis=1)[:, None] / V + 1e-6)
        hat = centred * inv_std
        d_hat = (hat * ln_weight + ln_bias - (v - x)) * ln_weight
        d_z2 = inv_std * (d_hat - tl.sum(d_hat, axis=1)[:, None] / V
                          - hat * tl.sum(d_hat * hat, axis=1)[:, None] / V)
        step2 = step * d_z2
        bias2 += tl.sum(step2, axis=0)[None, :]
        tl.debug_barrier()
        # Each block's backpropagation and step, from its weights at the mini-batch's start.
        for j in range(0, HIDDEN, HB):
            at1 = W1 + rk[:, None] * HIDDEN + (j + rj)[None, :]
            at2 = W2 + (j + rj)[:, None] * V + rv[None, :]
            W1_j, W2_j, b1_j = tl.load(at1), tl.load(at2), tl.load(b1 + j + rj)[None, :]
            z1 = _state_dot(x, W1_j, STATE_DOT, True) + b1_j
            hidden, t = _gelu(z1)
            d_z1 = _state_dot(d_z2, tl.trans(W2_j), STATE_DOT, False) * _gelu_slope(z1, t)
            step1 = step * d_z1
            tl.debug_barrier()  # every thread has read the block before any writes it
            tl.store(at1, W1_j + _state_dot(tl.trans(x), step1, STATE_DOT, False))
            tl.store(b1 + j + rj, (b1_j + tl.sum(step1, axis=0)[None, :]).reshape(HB))
            tl.store(at2, W2_j + _state_dot(tl.trans(hidden), step2, STATE_DOT, False))
        tl.debug_barrier()  # the next mini-batch reads the stored weights
    tl.store(b2 + i_nh * V + rv, bias2.reshape(V))


def inputs(B: int, T: int, dtype, device, H: int = 16, D: int = 64):
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=g)
    q, k = (torch.nn.functional.normalize(rand(B, T, H, D), dim=-1).to(dtype) for _ in "qk")
    v, rate = rand(B, T, H, D).to(dtype), (torch.rand(B, T, H, device=device, generator=g) * 0.1).to(dtype)
    ln_weight, ln_bias = 1 + 0.1 * rand(H, D), 0.1 * rand(H, D)
    state = (rand(B, H, D, 4 * D) * 0.05, rand(B, H, 1, 4 * D) * 0.05, rand(B, H, 4 * D, D) * 0.05,
             rand(B, H, 1, D) * 0.05)
    return q, k, v, rate, ln_weight, ln_bias, state


def generated_walk(tensors):
    """The generated walk kernel alone (no read-out, no checkpoints): its final weights."""
    q, k, v, rate, ln_weight, ln_bias, state = tensors
    B, T, H, K = q.shape
    final, starts = tuple(torch.empty_like(s) for s in state), tuple(torch.empty_like(s) for s in state)
    kept = tuple(s.new_empty(0) for s in state)

    def run():
        generated._minibatch_kernel[(B, H)](
            q, k, v, rate, ln_weight, ln_bias, *state, *final, *starts, *kept, v, q, q, K ** -0.5, T,
            CHECKPOINT=False, READ_OUT=False, **generated._sizes(q, v, None))
        return final
    return run


def streamed_walk(tensors, HB: int, warps: int):
    q, k, v, rate, ln_weight, ln_bias, state = tensors
    B, T, H, K = q.shape
    sizes = generated._sizes(q, v, None)
    work = tuple(torch.empty_like(s) for s in state)

    def run():
        for w, s in zip(work, state):
            w.copy_(s)
        _streamed_walk[(B, H)](k, v, rate, ln_weight, ln_bias, *work, T, H=H, K=K, V=K, HIDDEN=4 * K,
                               BS=sizes["BS"], HB=HB, STATE_DOT=sizes["STATE_DOT"], num_warps=warps, num_stages=1)
        return work
    return run


def gap(found, reference) -> float:
    return max(((f - r).abs().max() / r.abs().max()).item() for f, r in zip(found, reference))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--blocks", nargs="*", type=int, default=[32, 64, 128])
    parser.add_argument("--warps", nargs="*", type=int, default=[4, 8])
    parser.add_argument("--check", action="store_true", help="float32 on the CPU under the interpreter")
    args = parser.parse_args()
    say = teller(args.out)
    if args.check:
        tensors = inputs(1, 48, torch.float32, "cpu", H=2, D=16)
        reference = [x.clone() for x in generated_walk(tensors)()]
        for HB in (16, 32):
            say(f"streamed HB={HB}: final weights {gap(streamed_walk(tensors, HB, 4)(), reference):.2e} off the "
                "generated walk's (relative to the largest)")
        return
    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16, H=16 K=V=64 "
        "hidden 256")
    say(f"{'walk':24s} {'shape':>7s} {'ms':>8s} {'us/step':>8s} {'gap':>9s}")
    for B, T in ((4, 2048), (2, 8192)):
        tensors = inputs(B, T, torch.bfloat16, "cuda")
        steps = T // 16
        run = generated_walk(tensors)
        reference = [x.clone() for x in run()]
        ms = triton.testing.do_bench(run)
        say(f"{'generated':24s} {B}x{T:<5d} {ms:8.3f} {1000 * ms / steps:8.2f} {0:9.2e}")
        for HB in args.blocks:
            for warps in args.warps:
                run = streamed_walk(tensors, HB, warps)
                found = [x.clone() for x in run()]
                ms = triton.testing.do_bench(run)
                say(f"{f'streamed HB={HB} warps={warps}':24s} {B}x{T:<5d} {ms:8.3f} {1000 * ms / steps:8.2f} "
                    f"{gap(found, reference):9.2e}")


if __name__ == "__main__":
    main()
