"""Sweep the launch settings (LAUNCH table) of generated chunked Triton kernels on this GPU.

    python benchmarks/tune_gpu.py delta_rule simple_gla [--B 8 --T 2048]

One kernel's settings vary at a time, the others stay at the table's values; each line prints the whole
forward's `triton.testing.do_bench` time (bf16, H=16, K=V=128), and the best setting per kernel closes the
sweep. Paste the winners into the template's launch table to make them the default.
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
    "prepare": {"num_warps": [2, 4, 8], "num_stages": [1, 2]},
    "cumsum": {"BK": [32, 64, 128], "num_warps": [2, 4]},
    "scores": {"num_warps": [2, 4, 8], "num_stages": [1, 2, 3]},
    "states": {"BK": [32, 64, 128], "BV": [32, 64, 128], "num_warps": [2, 4, 8], "num_stages": [2, 3]},
    "states_long": {"BK": [32, 64, 128], "BV": [32, 64, 128], "num_warps": [2, 4, 8], "num_stages": [2, 3]},
    "output": {"BK": [64, 128], "BV": [64, 128], "num_warps": [4, 8], "num_stages": [1, 2]},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("layers", nargs="+")
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--T", type=int, default=2048)  # states_long applies where B * H is small (e.g. B=2 T=8192)
    parser.add_argument("--kernels", nargs="*", default=None, help="only sweep these kernels (e.g. states)")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, bf16, B={args.B} T={args.T} H=16 K=V=128")
    for name in args.layers:
        module = importlib.import_module(f"generated.{name}.chunk_triton")
        kernel = getattr(module, f"chunk_{name}_triton")
        p = LayerChecks(ROOT / "specs" / f"{name}.yaml", None, None).problem(args.T, 128, 128, B=args.B, H=16)
        p = p.to(torch.bfloat16, "cuda")
        default = {k: dict(v) for k, v in module.LAUNCH.items()}
        with torch.no_grad():
            base = triton.testing.do_bench(lambda: kernel(*p.args()))
            print(f"{name}: table {default} -> {base:.4f} ms", flush=True)
            for stage, settings in default.items():
                if args.kernels and stage not in args.kernels:
                    continue
                keys = [k for k in CANDIDATES[stage] if k in settings]
                results = []
                for values in itertools.product(*(CANDIDATES[stage][k] for k in keys)):
                    module.LAUNCH = {**default, stage: {**settings, **dict(zip(keys, values))}}
                    try:
                        ms = triton.testing.do_bench(lambda: kernel(*p.args()))
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
