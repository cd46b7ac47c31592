"""Where a nonlinear memory's walk over its mini-batches spends its time (GPU): ttt_linear's forward kernel
timed as generated and with one thing changed at a time (a product's precision, the checkpoints' stores,
warps, stages), with its read-out in the walk (B=4 T=2048) and with the walk alone (B=2 T=8192, its read-out
left out), and fla's walk kernel (chunk_ttt_linear_fwd_h) alone in the same call; with --backward, a training
step's backward (both backward kernels and the rates' on the host) with the walk back varied. Each variant is a copy of
generated/ttt_linear/online_triton.py with a text substitution, imported from a scratch folder; gap: the
largest difference to the generated kernel's output (or final weights) relative to its largest value.

    python benchmarks/online_walk_study.py [--out FILE] [--variants NAME...] [--backward NAME...]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from delta_family_gpu import teller  # noqa: E402  (this folder is on sys.path when a script here runs)

SOURCE = ROOT / "generated" / "ttt_linear" / "online_triton.py"
STATE_PRODUCT = "_state_dot(x, W, STATE_DOT, True)"
UPDATE_PRODUCT = "_state_dot(tl.trans(x), mix_end_d_z_1, STATE_DOT, False)"
BF16 = "tl.bfloat16"
LAST_RATE = "-_at(rate, rows, n - 1)"
LAST_RATE_LOADED = "-tl.load(rate_ptr + (first + n - 1) * H + i_h).to(tl.float32)"
CHECKPOINT_STORE = "_store(W_checkpoints, at, W, K, V)"
CHECKPOINT_STORE_BF16 = f"_store(W_checkpoints, at, W.to({BF16}), K, V)"
SPLIT_CHAIN = "tl.dot(exact, low, tl.dot(exact, middle, tl.dot(exact, high)))"
# fla's precision: both state products as one bfloat16 product, the weights and the steps' gradients rounded.
FLA_PRODUCTS = [(STATE_PRODUCT, f"tl.dot(x.to({BF16}), W.to({BF16}))"),
                (UPDATE_PRODUCT, f"tl.dot(tl.trans(x).to({BF16}), mix_end_d_z_1.to({BF16}))")]

# Products as two bfloat16 products (16 bits of the float32 operand b; a exact in bfloat16: the key rows), the
# second added onto acc; and the checkpoint stored by the Tensor Memory Accelerator from a descriptor.
HELPERS = """@triton.jit
def _exact_dot2(exact, b, acc):
    high = b.to(tl.bfloat16)
    low = (b - high.to(tl.float32)).to(tl.bfloat16)
    a = exact.to(tl.bfloat16)
    return tl.dot(a, low, tl.dot(a, high, acc))


@triton.jit
def _frontier(x, at, key_rows, query_rows, K: tl.constexpr, V: tl.constexpr, BS: tl.constexpr):
    where = x + at * K * V + tl.arange(0, BS)[:, None] * V + tl.arange(0, V)[None, :]
    tl.store(where, key_rows)
    tl.store(where + BS * V, query_rows)


"""
ANCHOR = "@triton.jit\ndef _state_dot("
STEP = ("W_mix_end_step = _state_dot(tl.trans(x), mix_end_d_z_1, STATE_DOT, False)\n"
        "    W_end = W + W_mix_end_step")
STATE_X2 = [(STATE_PRODUCT, "_exact_dot2(x, W, tl.zeros([BS, V], tl.float32))")]
STEPS_X2 = [(STEP, "W_end = _exact_dot2(tl.trans(x), mix_end_d_z_1, W)")]
TMA_STORE = [(CHECKPOINT_STORE, "W_checkpoints.store([at * K, 0], W)")]
# The walk stores, instead of the weights, the products of the mini-batch's rows with them that a read-out needs
# (key rows' xW and query rows' x_q W, [2 * BS, V] of the weights' [K, V] slot): the frontier of what touches
# the state, whose read-out needs no weights.
FRONTIER = [
    ("            " + CHECKPOINT_STORE + "\n", ""),
    ("(out, W_end, b_end) = _mini_batch(", "(out, W_end, b_end, xW_s, xq_s) = _mini_batch("),
    ("        if READ_OUT:\n            _store_rows(o, first, n, i_h, out, H, V, BS)\n",
     "        if CHECKPOINT:\n            _frontier(W_checkpoints, at, xW_s, xq_s, K, V, BS)\n"
     "        if READ_OUT:\n            _store_rows(o, first, n, i_h, out, H, V, BS)\n"),
    ("    return (out, W_end, b_end)", "    return (out, W_end, b_end, xW, xW_q_read)"),
    ("out, _, _ = _mini_batch(", "out, _, _, _, _ = _mini_batch("),
]

# name: (substitutions in the source, overrides of _sizes, checkpoints stored: False, True, "bf16" or "tma")
VARIANTS = {
    "generated": ([], {}, True),
    "state tf32": ([], {"STATE_DOT": "tf32"}, True),  # both state products
    "state bf16 x1": ([(STATE_PRODUCT, f"tl.dot(x.to({BF16}), W.to({BF16}))")], {}, True),
    "steps tf32": ([(UPDATE_PRODUCT, "tl.dot(tl.trans(x), mix_end_d_z_1, input_precision=DOT)")], {}, True),
    "update bf16": ([(UPDATE_PRODUCT, f"tl.dot(tl.trans(x).to({BF16}), mix_end_d_z_1.to({BF16}))")], {}, True),
    "fla's precision": (FLA_PRODUCTS, {}, True),
    "no checkpoints": ([], {}, False),
    "checkpoints bf16": ([(CHECKPOINT_STORE, CHECKPOINT_STORE_BF16)], {}, "bf16"),
    # fla's numerics whole: its products, and the checkpoint the same bfloat16 weights as the product's operand.
    "fla's precision, checkpoints bf16": (FLA_PRODUCTS + [(CHECKPOINT_STORE, CHECKPOINT_STORE_BF16)], {}, "bf16"),
    # The last row's rate as one scalar load instead of a row sum of the loaded rates.
    "last rate loaded": ([(LAST_RATE, LAST_RATE_LOADED)], {}, True),
    # The three bfloat16 products of the key rows' forward independent (summed after) instead of chained.
    "split apart": ([(SPLIT_CHAIN, "tl.dot(exact, high) + (tl.dot(exact, middle) + tl.dot(exact, low))")], {}, True),
    # All of the above, fla's precision and no checkpoints: what the rest of the walk costs.
    "lean": ([(LAST_RATE, LAST_RATE_LOADED)] + FLA_PRODUCTS, {}, False),
    # 16 bits of the weights (two bfloat16 products) in the key rows' forward, of the gradients in the steps
    # (added onto the weights by the product); both; both without checkpoints; the steps' TF32x3 added so.
    "state x2": (STATE_X2, {}, True),
    "steps x2": (STEPS_X2, {}, True),
    "x2": (STATE_X2 + STEPS_X2, {}, True),
    "x2, no checkpoints": (STATE_X2 + STEPS_X2, {}, False),
    "steps tf32x3 acc": ([(STEP, 'W_end = tl.dot(tl.trans(x), mix_end_d_z_1, W, input_precision="tf32x3")')],
                         {}, True),
    # The checkpoint written by TMA from shared memory (no conversion to a blocked layout in registers).
    "tma checkpoints": (TMA_STORE, {}, "tma"),
    "x2, tma checkpoints": (STATE_X2 + STEPS_X2 + TMA_STORE, {}, "tma"),
    "frontier": (FRONTIER, {}, True),
    "x2, frontier": (STATE_X2 + STEPS_X2 + FRONTIER, {}, True),
    # Fewer warps (a mini-batch's 16 rows: with 4 warps the row sums cross warps), at fla's precision too.
    "x2, warps 2": (STATE_X2 + STEPS_X2, {"num_warps": 2}, True),
    "fla's precision, warps 2": (FLA_PRODUCTS, {"num_warps": 2}, True),
    "fla's precision, warps 1": (FLA_PRODUCTS, {"num_warps": 1}, True),
    "lean, warps 2": ([(LAST_RATE, LAST_RATE_LOADED)] + FLA_PRODUCTS, {"num_warps": 2}, False),
    "warps 2": ([], {"num_warps": 2}, True),
    "warps 8": ([], {"num_warps": 8}, True),
    "stages 1": ([], {"num_stages": 1}, True),
    "stages 3": ([], {"num_stages": 3}, True),
}


ROW_STORES = ("        tl.store(dk_out + at_k, tl.load(dk_ptr + at_k, mask=m[:, None]) + b_x_4, mask=m[:, None])\n"
              "        tl.store(dv_out + at_v, tl.load(dv_ptr + at_v, mask=m[:, None]) + b_target, mask=m[:, None])\n")

# The walk back's variants: (substitutions in the source, overrides of its _sizes).
BACKWARD_VARIANTS = {
    "generated": ([], {}),
    # Its rows' gradients (dk, dv) left out: what the work beside its chain costs.
    "no row gradients": ([(ROW_STORES, "")], {}),
    # Its rows' gradients stored without adding the output rows' share (loaded back from memory) to them: what
    # those loads cost on the walk's path (the sum could be one element-wise pass after it).
    "no row loads": ([(ROW_STORES, ROW_STORES.replace("tl.load(dk_ptr + at_k, mask=m[:, None]) + ", "")
                       .replace("tl.load(dv_ptr + at_v, mask=m[:, None]) + ", ""))], {}),
    # dv kept, dk (two products with the weights and their adjoint) left out.
    "no dk": ([(ROW_STORES, ROW_STORES.splitlines(keepends=True)[1])], {}),
    "warps 4": ([], {"num_warps": 4}),
    "warps 16": ([], {"num_warps": 16}),
    "stages 1": ([], {"num_stages": 1}),
    "stages 3": ([], {"num_stages": 3}),
    "products bf16x3": ([], {"DOT": "bf16x3"}),
}


def variant_module(name: str, substitutions: list[tuple[str, str]], folder: Path):
    text = SOURCE.read_text().replace("from .", "from generated.ttt_linear.")  # its imports, absolute
    text = text.replace(ANCHOR, HELPERS + ANCHOR)
    for old, new in substitutions:
        if old not in text:
            raise SystemExit(f"{name}: {old!r} not in {SOURCE.name}")
        text = text.replace(old, new)
    path = folder / f"walk_{abs(hash(name)) % 10**8}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def walk(module, tensors, overrides: dict, checkpoints: bool, read_out: bool):
    """One launch of the module's walk kernel (no read-out kernel): the output and final weights."""
    q, k, v, rate, ln_weight, ln_bias, W, b = tensors
    B, T, H, K = q.shape
    V = v.shape[-1]
    total = B * -(-T // module.BATCH_SIZE)
    final = (torch.empty_like(W), torch.empty_like(b))
    starts = (torch.empty_like(W), torch.empty_like(b))
    kept = (W.new_empty(total if checkpoints else 0, *W.shape[1:],
                        dtype=torch.bfloat16 if checkpoints == "bf16" else W.dtype),
            b.new_empty(total if checkpoints else 0, *b.shape[1:]))
    o = torch.empty_like(v)
    if checkpoints == "tma":
        from triton.tools.tensor_descriptor import TensorDescriptor
        kept = (TensorDescriptor.from_tensor(kept[0].view(-1, V), [K, V]), kept[1])

    def run():
        module._minibatch_kernel[(B, H)](
            q, k, v, rate, ln_weight, ln_bias, W, b, *final, *starts, *kept, o, q, q, K ** -0.5, T,
            CHECKPOINT=bool(checkpoints), READ_OUT=read_out, **{**module._sizes(q, v, None), **overrides})
        return o, final[0]
    return run


def inputs(B: int, T: int, H: int = 16, D: int = 64) -> tuple:
    """A call's inputs, bf16 rows and float32 parameters and state: (q, k, v, rate, ln_weight, ln_bias, W, b)."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(torch.bfloat16)
    q, k = (torch.nn.functional.normalize(rand(B, T, H, D).float(), dim=-1).to(torch.bfloat16) for _ in "qk")
    v, rate = rand(B, T, H, D), (torch.rand(B, T, H, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    ln_weight, ln_bias = torch.ones(H, D, device="cuda"), torch.zeros(H, D, device="cuda")
    W = torch.randn(B, H, D, D, device="cuda", generator=g) * 0.02
    b = torch.zeros(B, H, 1, D, device="cuda")
    return q, k, v, rate, ln_weight, ln_bias, W, b


def with_walk_back(module, overrides: dict):
    """The module with its walk back's static arguments overridden (the forward's and the rows' share kept)."""
    sizes = module._sizes

    def patched(q, v, cu_seqlens, backward=False, rows_share=False):
        found = sizes(q, v, cu_seqlens, backward=backward, rows_share=rows_share)
        return {**found, **overrides} if backward and not rows_share else found
    module._sizes = patched
    return module


def backward_rows(say, names: list[str], folder: Path) -> None:
    """A training step's backward alone (the forward kept, its graph retained), per walk back variant."""
    for B, T in ((4, 2048), (2, 8192)):
        leaves = tuple(x.requires_grad_() for x in inputs(B, T))
        q, k, v, eta, ln_weight, ln_bias, W0, b0 = leaves
        D = q.shape[-1]
        d_o = torch.randn_like(v)
        steps, reference = -(-T // 16), None
        for name in names:
            substitutions, overrides = BACKWARD_VARIANTS[name]
            module = with_walk_back(variant_module(f"back {name}", substitutions, folder), overrides)
            o, _ = module.forward(q, k, v, ln_weight, ln_bias, eta, D ** -0.5, (W0, b0), False)

            def run():
                return torch.autograd.grad(o, leaves, d_o, retain_graph=True)
            found = run()
            ms = triton.testing.do_bench(run)
            reference = reference or found
            gap = max(((f - r).float().abs().max() / r.float().abs().max().clamp_min(1e-30)).item()
                      for f, r in zip(found[:3], reference[:3]))
            say(f"{'back ' + name:18s} {B}x{T:<5d} {'backward':>10s} {ms:8.3f} {1000 * ms / steps:8.2f} {gap:9.2e}")


def compiled_counts(module, checkpoints) -> str:
    """The walk kernel (alone, B=2 T=8192's launch, bf16 inputs) compiled for sm_90a on this machine (no GPU
    needed): its registers, MMA instructions, shared-memory copies and layout conversions."""
    from kernel_resources import compile_for_hopper, cubin_resources

    sys.modules.setdefault(module.__name__, module)  # compile_for_hopper imports it by name
    sizes = {**module._sizes(_Rows(torch.bfloat16), _Rows(torch.bfloat16), None), "CHECKPOINT": bool(checkpoints),
             "READ_OUT": False}
    bf16 = ("q_ptr", "k_ptr", "v_ptr", "rate_ptr", "o", "cu_seqlens", "batch_offsets")
    arguments = {}
    for name in module._minibatch_kernel.arg_names:
        if name in sizes or name in ("scale", "T"):
            arguments[name] = ["value", sizes.get(name, 0.125 if name == "scale" else 8192)]
        elif name == "W_checkpoints" and checkpoints == "tma":
            arguments[name] = ["signature", "tensordesc<fp32[64, 64]>"]
        else:
            bf16_checkpoints = name == "W_checkpoints" and checkpoints == "bf16"
            arguments[name] = ["tensor", "bfloat16" if name in bf16 or bf16_checkpoints else "float32"]
    arguments.update({k: ["value", sizes[k]] for k in ("num_warps", "num_stages")})
    kernel, _ = compile_for_hopper(module.__name__, "_minibatch_kernel", arguments)
    registers, stack = cubin_resources(kernel.asm["cubin"])
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    return (f"registers {registers} stack {stack} wgmma {ptx.count('wgmma.mma_async')} "
            f"mma.sync {ptx.count('mma.sync')} local_alloc {ttgir.count('ttg.local_alloc')} "
            f"convert_layout {ttgir.count('ttg.convert_layout')} bar.sync {ptx.count('bar.sync')}")


class _Rows:
    """What _sizes reads of q and v: B=2 T=8192 H=16 K=V=64 on a GPU."""
    shape, is_cuda = (2, 8192, 16, 64), True

    def __init__(self, dtype):
        self.dtype = dtype


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--backward", nargs="*", default=[], choices=list(BACKWARD_VARIANTS),
                        help="the walk back's variants to time in a training step's backward (none: no such rows)")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile the variants' walk kernels for sm_90a on this machine and count what they hold")
    args = parser.parse_args()
    say = teller(args.out)
    if args.compile_only:
        folder = Path(tempfile.mkdtemp())
        for name in args.variants:
            substitutions, overrides, checkpoints = VARIANTS[name]
            say(f"{name:22s} {compiled_counts(variant_module(name, substitutions, folder), checkpoints)}")
        return

    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16, H=16 K=V=64")
    say(f"{'variant':18s} {'shape':>7s} {'pass':>10s} {'ms':>8s} {'us/step':>8s} {'gap':>9s}")
    folder = Path(tempfile.mkdtemp())
    if args.backward:
        backward_rows(say, args.backward, folder)
    modules = {name: variant_module(name, VARIANTS[name][0], folder) for name in args.variants}
    for B, T, read_out in ((4, 2048, True), (2, 8192, False), (4, 2048, False)):
        tensors = inputs(B, T)
        q, k, v, rate, ln_weight, ln_bias, W, b = tensors
        steps = -(-T // 16)
        reference = None
        pass_name = "walk+read" if read_out else "walk"
        for name, module in modules.items():
            _, overrides, checkpoints = VARIANTS[name]
            run = walk(module, tensors, overrides, checkpoints, read_out)
            found = [x.float().clone() for x in run()]
            ms = triton.testing.do_bench(run)
            if reference is None:
                reference = found
            compared = found[0] if read_out else found[1]
            against = reference[0] if read_out else reference[1]
            gap = ((compared - against).abs().max() / against.abs().max()).item()
            say(f"{name:18s} {B}x{T:<5d} {pass_name:>10s} {ms:8.3f} {1000 * ms / steps:8.2f} {gap:9.2e}")
        try:
            from fla.ops.ttt.chunk import chunk_ttt_linear_fwd_h, chunk_ttt_linear_fwd_kernel_h
        except ImportError as error:
            say(f"fla-core not importable: {error}")
            continue

        def fla_walk():
            return chunk_ttt_linear_fwd_h(k, v, ln_weight.to(k.dtype), ln_bias.to(k.dtype),
                                          rate[..., None], 1e-6, initial_state=W, initial_state_bias=b,
                                          output_final_state=True, chunk_size=16)
        fla_walk()
        ms = triton.testing.do_bench(fla_walk)
        tuner = chunk_ttt_linear_fwd_kernel_h  # its autotuner, under any heuristics' wrappers
        while not hasattr(tuner, "best_config") and hasattr(tuner, "fn"):
            tuner = tuner.fn
        best = getattr(tuner, "best_config", None)
        say(f"{'fla walk':18s} {B}x{T:<5d} {'walk':>10s} {ms:8.3f} {1000 * ms / steps:8.2f} {'':9s} {best}")


if __name__ == "__main__":
    main()
