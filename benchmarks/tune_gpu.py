"""Sweep the launch settings (LAUNCH table) of generated chunked Triton kernels on this GPU.

    python benchmarks/tune_gpu.py delta_rule simple_gla [--B 8 --T 2048] [--backward] [--kernels dstates ...]
    python benchmarks/tune_gpu.py softmax_attention --B 4 --T 4096 --backward   (attention: flash_triton.py)

One kernel's settings vary at a time, the others stay at the table's values; each line prints the whole
forward's `triton.testing.do_bench` time (bf16, H=16, K=V=128), or with --backward a training step's
(forward and backward of `chunk_<name>`, gradients of every input), and the best setting per kernel closes
the sweep. Paste the winners into the template's launch table to make them the default.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ttr_codegen.testing import LayerChecks  # noqa: E402

CANDIDATES = {
    "prepare": {"BK": [64, 128], "num_warps": [2, 4, 8], "num_stages": [1, 2]},
    "cumsum": {"BK": [32, 64, 128], "num_warps": [2, 4]},
    "scores": {"BK": [32, 64, 128], "num_warps": [1, 2, 4, 8], "num_stages": [1, 2]},
    "states": {"BK": [32, 64, 128], "BV": [32, 64, 128], "num_warps": [2, 4, 8], "num_stages": [2, 3]},
    "states_long": {"BK": [32, 64, 128], "BV": [32, 64, 128], "num_warps": [2, 4, 8], "num_stages": [2, 3]},
    "output": {"BK": [64, 128], "BV": [64, 128], "num_warps": [4, 8], "num_stages": [1, 2]},
    # The backward's: the adjoint walks, then the kernels that run every chunk in parallel.
    "dstates": {"BK": [32, 64, 128], "BV": [32, 64, 128], "num_warps": [2, 4, 8], "num_stages": [1, 2, 3]},
    "dstates_long": {"BK": [32, 64, 128], "BV": [32, 64, 128], "num_warps": [2, 4, 8], "num_stages": [1, 2, 3]},
    "dv": {"BK": [32, 64, 128], "BV": [32, 64, 128], "num_warps": [4, 8], "num_stages": [1, 2]},
    "dv_local": {"BK": [32, 64, 128], "BV": [32, 64, 128], "num_warps": [4, 8], "num_stages": [1, 2]},
    "intra": {"BK": [32, 64, 128], "num_warps": [2, 4, 8], "num_stages": [1, 2]},
    "dqk": {"BK": [32, 64, 128], "BV": [32, 64, 128], "num_warps": [4, 8], "num_stages": [1, 2]},
    "dqkw": {"BK": [32, 64, 128], "BV": [32, 64, 128], "num_warps": [4, 8], "num_stages": [1, 2]},
    "wy_backward": {"BK": [32, 64, 128], "BV": [32, 64, 128], "num_warps": [4, 8], "num_stages": [1, 2]},
    "gate_backward": {"BK": [32, 64, 128], "num_warps": [2, 4, 8]},
    # Local-constant attention (flash_triton.py): query and key blocks.
    "forward": {"BM": [64, 128], "BN": [32, 64, 128], "num_warps": [4, 8], "num_stages": [1, 2, 3]},
    "dq": {"BM": [64, 128], "BN": [32, 64, 128], "num_warps": [4, 8], "num_stages": [1, 2, 3]},
    "dkdv": {"BM": [32, 64, 128], "BN": [64, 128], "num_warps": [4, 8], "num_stages": [1, 2, 3]},
    # Momentum's walks over the chunks (forward and reverse), the whole stacked state per program.
    "walk": {"BV": [16, 32, 64], "num_warps": [2, 4, 8], "num_stages": [1, 2]},
    "walk_backward": {"BV": [16, 32, 64], "num_warps": [2, 4, 8], "num_stages": [1, 2]},
}


def timed_step(name: str, B: int, T: int, backward: bool):
    """A function running the layer's Triton forward (or, with backward, a training step) on bf16 inputs."""
    checks = LayerChecks(ROOT / "specs" / f"{name}.yaml", None, None)
    p = checks.problem(T, 128, 128, B=B, H=16).to(torch.bfloat16, "cuda")
    if (ROOT / "generated" / name / "flash_triton.py").exists():  # attention: the local-constant kernels
        kernel = getattr(importlib.import_module(f"generated.{name}.flash_triton"), f"flash_{name}_triton")
        args = [x.requires_grad_(backward) for x in p.args()]
        d_out = torch.randn(B, T, 16, 128, device="cuda", dtype=torch.bfloat16)

        def attention():
            o, _ = kernel(*args)
            if backward:
                torch.autograd.grad(o, args, d_out)
        return attention
    if not backward:
        kernel = getattr(importlib.import_module(f"generated.{name}.chunk_triton"), f"chunk_{name}_triton")

        def forward():
            with torch.no_grad():
                kernel(*p.args())
        return forward
    layer = getattr(importlib.import_module(f"generated.{name}"), f"chunk_{name}")
    args = [x.requires_grad_(True) for x in p.args()]
    trainable = [p.q, p.k, p.v, *checks.per_token_inputs(p.inputs)]
    d_out = torch.randn(B, T, 16, 128, device="cuda", dtype=torch.bfloat16)

    def step():
        torch.autograd.grad(layer(*args)[0], trainable, d_out)
    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("layers", nargs="+")
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--T", type=int, default=2048)  # states_long applies where B * H is small (e.g. B=2 T=8192)
    parser.add_argument("--kernels", nargs="*", default=None, help="only sweep these kernels (e.g. states)")
    parser.add_argument("--backward", action="store_true", help="time a training step (the backward's kernels too)")
    args = parser.parse_args()
    what = "forward + backward" if args.backward else "forward"
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, bf16 {what}, B={args.B} T={args.T} H=16 K=V=128")
    for name in args.layers:
        kind = "flash_triton" if (ROOT / "generated" / name / "flash_triton.py").exists() else "chunk_triton"
        module = importlib.import_module(f"generated.{name}.{kind}")
        run = timed_step(name, args.B, args.T, args.backward)
        default = {k: dict(v) for k, v in module.LAUNCH.items()}
        base = triton.testing.do_bench(run)
        print(f"{name}: table {default} -> {base:.4f} ms", flush=True)
        for stage in [k for k in args.kernels if k in default] if args.kernels else default:  # --kernels' order
            settings = default[stage]
            keys = [k for k in CANDIDATES.get(stage, {}) if k in settings]
            if not keys:
                print(f"    {stage}: no candidates to sweep")
                continue
            results = []
            for values in itertools.product(*(CANDIDATES[stage][k] for k in keys)):
                module.LAUNCH = {**default, stage: {**settings, **dict(zip(keys, values))}}
                try:
                    ms = triton.testing.do_bench(run)
                except torch.AcceleratorError as error:  # e.g. an illegal address: every later launch would fail too
                    print(f"    {stage} {dict(zip(keys, values))}: {error}".splitlines()[0])
                    sys.exit("the CUDA context is lost: sweep the kernels left in a new process (--kernels)")
                except Exception as error:  # e.g. out of shared memory for this tile
                    print(f"    {stage} {dict(zip(keys, values))}: failed ({type(error).__name__})")
                    continue
                results.append((ms, dict(zip(keys, values))))
            results.sort(key=lambda r: r[0])
            for ms, values in results[:3]:
                print(f"    {stage} {values}: {ms:.4f} ms", flush=True)
        module.LAUNCH = default


if __name__ == "__main__":
    main()
