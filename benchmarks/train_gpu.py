"""Forward + backward on the GPU: generated layers against fla-core's chunk kernels, bf16.

    python benchmarks/train_gpu.py [--only simple_gla ...]

For each layer with an fla peer whose chunked form trains on the Triton kernels (the derived adjoint's
backward kernels), at B=8 T=2048 and B=2 T=8192, H=16, K=V=128: `triton.testing.do_bench` median ms of one
forward and one backward (gradients of every input), the ratio fla / ours, and the peak memory of that
step beyond the inputs. Where fla refuses (its guard against Triton 3.4-3.7.0 on Hopper), it says so;
--bypass-fla-guard turns that guard off to time fla's kernels anyway (its gated backward is known to give
wrong gradients on those Triton versions, so such a row compares time only).
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from chunk_gpu import PEERS, cuda_inputs  # noqa: E402
from ttr_codegen.testing import LayerChecks, triton_trained_layers  # noqa: E402

# The layers with an fla peer whose chunked form trains on the Triton kernels (in PEERS' order).
_ON_TRITON = set(triton_trained_layers(ROOT / "generated"))
TRAINED = [name for name, peer in PEERS.items() if peer and name in _ON_TRITON]


def step_ms_and_memory(run, leaves, d_out) -> tuple[float, float]:
    """(median ms, peak MiB beyond what is allocated before) of forward + backward."""
    def step():
        o = run()
        torch.autograd.grad(o, leaves, d_out)

    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return triton.testing.do_bench(step), peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--bypass-fla-guard", action="store_true",
                        help="time fla's gated backward even where it refuses this Triton version (timing only)")
    args = parser.parse_args()
    if args.bypass_fla_guard:
        import fla.ops.common.chunk_o as guarded

        guarded.TRITON_ABOVE_3_7_1 = True  # the flag its guard reads
        print("fla's Triton-version guard is bypassed: its gated backward rows compare time only")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16 forward+backward")
    print(f"{'layer':18s} {'shape':22s} {'ours (ms)':>10s} {'fla (ms)':>10s} {'fla/ours':>9s} {'ours MiB':>9s} {'fla MiB':>8s}")
    for name in [name for name in args.only if name in TRAINED] if args.only else TRAINED:  # --only's order
        module_name, function, kwargs = PEERS[name]
        ours = getattr(importlib.import_module(f"generated.{name}"), f"chunk_{name}")
        peer = getattr(importlib.import_module(module_name), function)
        checks = LayerChecks(ROOT / "specs" / f"{name}.yaml", None, None)
        for B, T in ((8, 2048), (2, 8192)):
            p = checks.problem(T, 128, 128, B=B, H=16).to(torch.bfloat16)
            q, k, v = (x.cuda().requires_grad_(True) for x in p.args()[:3])
            inputs = cuda_inputs(name, p)
            trainable = [x.requires_grad_(True) for x in checks.per_token_inputs(inputs)]
            d_out = torch.randn(B, T, 16, 128, device="cuda", dtype=torch.bfloat16)
            t_ours, m_ours = step_ms_and_memory(lambda: ours(q, k, v, *inputs.values())[0], [q, k, v, *trainable], d_out)
            try:
                t_peer, m_peer = step_ms_and_memory(lambda: peer(q, k, v, **kwargs(inputs))[0], [q, k, v, *trainable], d_out)
                ratio = f"{t_peer / t_ours:8.2f}x"
            except Exception as error:  # e.g. fla's guard on this Triton version
                t_peer, m_peer, ratio = float("nan"), float("nan"), f"  refuses ({type(error).__name__}: {str(error)[:60]})"
            print(f"{name:18s} {f'B={B} T={T} H=16 K=V=128':22s} {t_ours:10.3f} {t_peer:10.3f} {ratio} "
                  f"{m_ours:9.0f} {m_peer:8.0f}", flush=True)


if __name__ == "__main__":
    main()
