"""Local-constant attention on the GPU: the generated flash kernels against their peers, bf16, forward and
forward + backward.

    python benchmarks/attention_gpu.py [--layers softmax window forgetting gaussian] [--shapes 4x4096 2x8192]
                                       [--csv times.csv]

H = 16, D = 128, causal. Peers: PyTorch's SDPA (softmax; also the yardstick of the Gaussian kernel and of local-linear
attention, 16 conjugate-gradient steps), FlexAttention
with the same sliding window (512 keys; the layer is generated from the catalogue's sliding-window spec with
that window), fla's `parallel_forgetting_attn` (forgetting attention; needs fla-core). Each row: median ms
(`triton.testing.do_bench`), the ratio peer / ours (> 1: ours is faster), the largest gap between the two
outputs relative to the largest output, and the first call's seconds (compiling; from an empty Triton cache).
Decoding rows time one query against a cache of T - 1 tokens (with the cache concatenated per call, as a
layer's generation step does) against SDPA over the whole cache. --csv writes every row for plotting time
against T.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="ttr-bench-triton-"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chunk_gpu import first_call_seconds  # noqa: E402  (this folder is on sys.path when a script here runs)

WINDOW = 512
H, D = 16, 128


def generated_kernel(layer: str, edit: tuple[str, str] | None = None):
    """flash_<layer>_triton from the catalogue's spec, or from the spec with one text `edit` (old, new: a window,
    an iteration count) generated into a temporary folder."""
    if edit is None:
        module = importlib.import_module(f"generated.{layer}.flash_triton")
        return getattr(module, f"flash_{layer}_triton")
    from ttr_codegen.fuzz import _import_package
    from ttr_codegen.pipeline import compile_spec
    from ttr_codegen.render.writer import plan_changes, write_atomically

    text = (ROOT / "specs" / f"{layer}.yaml").read_text()
    assert edit[0] in text, f"{layer}.yaml has no {edit[0]!r}"
    folder = Path(tempfile.mkdtemp(prefix="ttr-bench-spec-"))
    spec = folder / f"{layer}.yaml"
    spec.write_text(text.replace(*edit))
    compiled = compile_spec(spec, folder / "out")
    write_atomically(plan_changes(compiled.package_dir, compiled.files), force=True)
    package = _import_package(folder / "out" / layer)
    return getattr(importlib.import_module(f"{package.__name__}.flash_triton"), f"flash_{layer}_triton")


def local_linear_rows(q, k, v, rows, scale: float, ridge: float, solve) -> torch.Tensor:
    """The local-linear fit's output at query positions `rows` of batch row 0, every head, in q's dtype:
    w = softmax(scale q.k) over keys j <= t, x = solve(C + ridge I, q - k_bar) for the slope,
    o = v_bar + sum_j w_j ((k_j - k_bar) . x) (v_j - v_bar). [len(rows), H, V]."""
    out = []
    for t in rows:
        query, keys, values = q[0, t], k[0, :t + 1], v[0, :t + 1]
        w = torch.softmax(scale * torch.einsum("nhk,hk->hn", keys, query), dim=-1)
        k_bar, v_bar = torch.einsum("hn,nhk->hk", w, keys), torch.einsum("hn,nhv->hv", w, values)
        centred = keys - k_bar
        system = torch.einsum("hn,nhk,nhl->hkl", w, centred, centred) + ridge * torch.eye(q.shape[-1], device=q.device,
                                                                                           dtype=q.dtype)
        x = solve(system, query - k_bar)
        out.append(v_bar + torch.einsum("hn,nhv->hv", w * torch.einsum("nhk,hk->hn", centred, x), values - v_bar))
    return torch.stack(out)


def exact_local_linear(q, k, v, rows, scale: float, ridge: float) -> torch.Tensor:
    """local_linear_rows in float64 with the normal equations solved directly."""
    return local_linear_rows(q.double(), k.double(), v.double(), rows, scale, ridge, torch.linalg.solve)


def local_linear_study(iterations: list[int], B: int = 4, T: int = 4096, widths=(64, 128), threshold: float = 1e-5):
    """Local-linear attention's conjugate-gradient solve: its gap to the exact solve against the step count
    (float32 and bf16 inputs, sampled query rows), then at the fewest steps that reach `threshold` (float32
    agreement) its forward and forward+backward times against SDPA's, bf16, at each head width."""
    layer, ridge = "local_linear_attention_cg", 0.1
    print(f"\nlocal-linear attention, conjugate-gradient steps against the exact solve (gap: max |o - o_exact| / "
          f"max |o_exact| over 32 query rows of B=1 T={T}, H={H})")
    print(f"{'D':>4} {'steps':>6} {'gap fp32':>10} {'gap bf16':>10}")
    kernels = {n: generated_kernel(layer, ("iterations: 16", f"iterations: {n}")) for n in iterations}
    needed = {}
    for D in widths:
        generator = torch.Generator(device="cuda").manual_seed(1)
        q, k, v = (torch.randn(1, T, H, D, device="cuda", generator=generator) for _ in range(3))
        rows = torch.linspace(0, T - 1, 32).long().tolist()
        exact = exact_local_linear(q, k, v, rows, D ** -0.5, ridge)
        for n, kernel in kernels.items():
            gaps = []
            for dtype in (torch.float32, torch.bfloat16):
                with torch.no_grad():
                    o = kernel(q.to(dtype), k.to(dtype), v.to(dtype), scale=D ** -0.5)[0][0, rows].double()
                gaps.append(((o - exact).abs().max() / exact.abs().max()).item())
            print(f"{D:>4} {n:>6} {gaps[0]:>10.2e} {gaps[1]:>10.2e}", flush=True)
            if gaps[0] <= threshold and D not in needed:
                needed[D] = n
    print(f"\nat the fewest steps with an fp32 gap <= {threshold:g}, bf16, B={B} T={T} H={H}, against SDPA causal")
    print(f"{'D':>4} {'steps':>6} {'pass':<8} {'ours ms':>9} {'SDPA ms':>9} {'ours/SDPA':>10} {'first s':>8}")
    rows = []
    for D in widths:
        n = needed.get(D, max(iterations))
        generator = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=generator) for _ in range(3))
        for backward in (False, True):
            ms, first = timed(kernels[n], [q, k, v], backward)
            sdpa_ms, _ = timed(sdpa, [q, k, v], backward)
            what = "fwd+bwd" if backward else "fwd"
            print(f"{D:>4} {n:>6} {what:<8} {ms:>9.3f} {sdpa_ms:>9.3f} {ms / sdpa_ms:>9.1f}x {first:>8.2f}", flush=True)
            rows.append(dict(layer=f"local_linear_D{D}_cg{n}", B=B, T=T, what=what, ours_ms=ms, peer_ms=sdpa_ms,
                             peer="SDPA causal (softmax)", gap=float("nan"), first_s=first))
    return rows


def sdpa(q, k, v, g=None):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def flex_window(T: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < WINDOW)

    mask = create_block_mask(sliding, None, None, T, T, device="cuda")
    compiled = torch.compile(flex_attention)

    def run(q, k, v, g=None):
        return compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask).transpose(1, 2)
    return run


def fla_forgetting(q, k, v, g):
    from fla.ops.forgetting_attn import parallel_forgetting_attn

    return parallel_forgetting_attn(q, k, v, g, scale=D ** -0.5)


def timed(op, args, backward: bool):
    """(median ms, first call s) of op(*args), with a backward through every input where asked."""
    leaves = [x.clone().requires_grad_(backward) for x in args]
    d_out = torch.randn(*args[0].shape[:3], args[2].shape[-1], device="cuda", dtype=args[0].dtype)

    def run():
        o = op(*leaves)
        o = o[0] if isinstance(o, tuple) else o
        if backward:
            torch.autograd.grad(o, leaves, d_out)
        return o
    first = first_call_seconds(run)
    return triton.testing.do_bench(run), first


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", nargs="*", default=["softmax", "window", "forgetting", "gaussian", "local_linear"])
    parser.add_argument("--shapes", nargs="*", default=["4x4096", "2x8192", "1x16384"])
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--cg-steps", nargs="*", type=int, default=[4, 8, 12, 16, 24, 32],
                        help="local-linear's conjugate-gradient step counts to compare with the exact solve")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16, H={H} D={D}")
    layers = {  # name -> (our layer, window, peer name, peer factory by T, whether it takes the gate)
        "softmax": ("softmax_attention", None, "SDPA causal", lambda T: sdpa, False),
        "window": ("sliding_window_attention", WINDOW, f"FlexAttention window {WINDOW}", flex_window, False),
        "forgetting": ("forgetting_attention", None, "fla parallel_forgetting_attn", lambda T: fla_forgetting, True),
        "gaussian": ("gaussian_kernel_attention", None, "SDPA causal (softmax)", lambda T: sdpa, False),
        # Local-linear, the catalogue's 16 conjugate-gradient steps (the study below finds the steps needed).
        "local_linear": ("local_linear_attention_cg", None, "SDPA causal (softmax)", lambda T: sdpa, False),
    }
    yardsticks = {"gaussian", "local_linear"}  # a different layer timed beside ours: no gap
    rows = []
    print(f"{'layer':<12} {'shape':<10} {'pass':<8} {'ours ms':>9} {'peer ms':>9} {'peer/ours':>9} {'gap':>9} "
          f"{'first s':>8}  peer")
    for name in args.layers:
        layer, window, peer_name, peer_for, gated = layers[name]
        ours = generated_kernel(layer, None if window is None else ("window: 32", f"window: {window}"))
        for shape in args.shapes:
            B, T = (int(x) for x in shape.split("x"))
            generator = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=generator)
                       for _ in range(3))
            inputs = [q, k, v]
            if gated:
                inputs.append(F.logsigmoid(torch.randn(B, T, H, device="cuda", generator=generator) + 4))
            try:
                peer = peer_for(T)
            except Exception as error:  # e.g. fla-core missing
                peer, peer_name = None, f"{peer_name}: {type(error).__name__}"
            for backward in (False, True):
                ms, first = timed(ours, inputs, backward)
                peer_ms, gap = float("nan"), float("nan")
                if peer is not None and name not in yardsticks:
                    try:
                        peer_ms, _ = timed(peer, inputs, backward)
                        with torch.no_grad():
                            o, o_peer = ours(*inputs)[0].float(), peer(*inputs).float()
                        gap = ((o - o_peer).abs().max() / o_peer.abs().max()).item()
                    except Exception as error:
                        print(f"    {peer_name} failed: {type(error).__name__}: {error}".splitlines()[0])
                elif peer is not None:  # a yardstick only: a different layer
                    peer_ms, _ = timed(peer, inputs, backward)
                what = "fwd+bwd" if backward else "fwd"
                print(f"{name:<12} {shape:<10} {what:<8} {ms:>9.3f} {peer_ms:>9.3f} {peer_ms / ms:>8.2f}x {gap:>9.1e} "
                      f"{first:>8.2f}  {peer_name}", flush=True)
                rows.append(dict(layer=name, B=B, T=T, what=what, ours_ms=ms, peer_ms=peer_ms, peer=peer_name,
                                 gap=gap, first_s=first))
            del inputs, q, k, v
            torch.cuda.empty_cache()
    # Decoding: one query per sequence against a cache of T - 1 tokens (the split-key kernel), against SDPA.
    print(f"{'layer':<12} {'cache':<10} {'pass':<8} {'ours ms':>9} {'SDPA ms':>9} {'SDPA/ours':>9}")
    for name in [n for n in args.layers if n != "local_linear"]:
        layer, window, _, _, gated = layers[name]
        ours = generated_kernel(layer, None if window is None else ("window: 32", f"window: {window}"))
        for shape in args.shapes:
            B, T = (int(x) for x in shape.split("x"))
            q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            cache = [k[:, :-1], v[:, :-1]] + ([F.logsigmoid(torch.randn(B, T - 1, H, device="cuda") + 4)] if gated else [])
            now = [q[:, -1:], k[:, -1:], v[:, -1:]] + ([torch.zeros(B, 1, H, device="cuda")] if gated else [])
            with torch.no_grad():
                ms = triton.testing.do_bench(lambda: ours(*now, initial_state=tuple(cache)))
                sdpa_ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(
                    q[:, -1:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)))
            print(f"{name:<12} {shape:<10} {'decode':<8} {ms:>9.3f} {sdpa_ms:>9.3f} {sdpa_ms / ms:>8.2f}x", flush=True)
            rows.append(dict(layer=name, B=B, T=T, what="decode", ours_ms=ms, peer_ms=sdpa_ms, peer="SDPA",
                             gap=float("nan"), first_s=float("nan")))
    if "local_linear" in args.layers and args.cg_steps:
        rows += local_linear_study(args.cg_steps)
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
