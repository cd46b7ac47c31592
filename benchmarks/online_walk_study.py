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
# The forward's products on the way to the next weights, as generated: the transposed mini-batch's (a small
# state's: the weights, or the gradients, split into three bfloat16 parts times the exact key rows) and the
# rows' (the key rows times the weights' parts; the steps in TF32x3).
STATE_PRODUCT = '_state_dot(W, x, STATE_DOT, "a")'
STEP = ('W_mix_end_step = _state_dot(mix_end_d_z_1, tl.trans(x), STATE_DOT, "a")\n'
        "    W_end = W + W_mix_end_step")
LAST_RATE = "-_at(rate, rows, n - 1)"
LAST_RATE_LOADED = "-tl.load(rate_ptr + (first + n - 1) * H + i_h).to(tl.float32)"
CHECKPOINT_STORE = "_store_state(W_checkpoints, at, W, K, V, TRANSPOSED)"


def parts(count: int, step_onto_weights: bool = True) -> list[tuple[str, str]]:
    """Both state products with `count` bfloat16 parts of the split operand (1: fla's precision, the weights
    and the gradients rounded to bfloat16), the step added onto the weights by the product itself."""
    step = ("W_end = _parts_dot(mix_end_d_z_1, tl.trans(x), W, {count})" if step_onto_weights else
            "W_end = W + _parts_dot(mix_end_d_z_1, tl.trans(x), tl.zeros_like(W), {count})").format(count=count)
    return [(STATE_PRODUCT, f"_parts_dot(W, x, tl.zeros_like(x), {count})"), (STEP, step)]


# a @ b + acc with a (float32) in `PARTS` bfloat16 parts, b exact in bfloat16.
HELPERS = """@triton.jit
def _parts_dot(a, b, acc, PARTS: tl.constexpr):
    high = a.to(tl.bfloat16)
    exact = b.to(tl.bfloat16)
    acc = tl.dot(high, exact, acc)
    if PARTS >= 2:
        rest = a - high.to(tl.float32)
        middle = rest.to(tl.bfloat16)
        acc = tl.dot(middle, exact, acc)
        if PARTS == 3:
            acc = tl.dot((rest - middle.to(tl.float32)).to(tl.bfloat16), exact, acc)
    return acc


"""
ANCHOR = "@triton.jit\ndef _state_dot("

# name: (substitutions in the source, overrides of _sizes, checkpoints stored: False or True)
VARIANTS = {
    "generated": ([], {}, True),
    "rows": ([], {"TRANSPOSED": False}, True),  # the mini-batch's tiles as rows: the weights through shared memory
    "no checkpoints": ([], {}, False),
    "steps onto weights": (parts(3), {}, True),  # three parts, the step added by the product
    "x2": (parts(2), {}, True),  # 16 bits of the split operand
    "x2, no checkpoints": (parts(2), {}, False),
    "fla's precision": (parts(1), {}, True),
    # fla's precision, no checkpoints and the last row's rate as a scalar load: what the rest of the walk costs.
    "lean": (parts(1) + [(LAST_RATE, LAST_RATE_LOADED)], {}, False),
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
    total = B * -(-T // module.BATCH_SIZE)
    final = (torch.empty_like(W), torch.empty_like(b))
    starts = (torch.empty_like(W), torch.empty_like(b))
    kept = (W.new_empty(total if checkpoints else 0, *W.shape[1:]), b.new_empty(total if checkpoints else 0, *b.shape[1:]))
    o = torch.empty_like(v)

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


def compiled_counts(module, overrides: dict, checkpoints) -> str:
    """The walk kernel (alone, B=2 T=8192's launch, bf16 inputs) compiled for sm_90a on this machine (no GPU
    needed): its registers, MMA instructions, shared-memory copies and layout conversions."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernel_resources import cubin_resources

    jit = module._minibatch_kernel
    constants = {**module._sizes(_Rows(torch.bfloat16), _Rows(torch.bfloat16), None), **overrides,
                 "CHECKPOINT": bool(checkpoints), "READ_OUT": False}
    options = {k: constants.pop(k) for k in ("num_warps", "num_stages")}
    bf16 = ("q_ptr", "k_ptr", "v_ptr", "rate_ptr", "o", "cu_seqlens", "batch_offsets")
    signature, attributes = {}, {}
    for i, param in enumerate(jit.params):
        if param.name in constants:
            signature[param.name] = "constexpr"
        elif param.name in ("scale", "T"):
            signature[param.name] = "fp32" if param.name == "scale" else "i32"
        else:
            signature[param.name] = "*bf16" if param.name in bf16 else "*fp32"
            attributes[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(jit, signature, constants, attributes), target=GPUTarget("cuda", 90, 32),
                            options=options)
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
            say(f"{name:22s} {compiled_counts(variant_module(name, substitutions, folder), overrides, checkpoints)}")
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
        best = getattr(chunk_ttt_linear_fwd_kernel_h, "best_config", None)
        say(f"{'fla walk':18s} {B}x{T:<5d} {'walk':>10s} {ms:8.3f} {1000 * ms / steps:8.2f} {'':9s} {best}")


if __name__ == "__main__":
    main()
