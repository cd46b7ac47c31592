"""Find which backward kernel goes wrong, and which launch settings put it right.

    python benchmarks/diagnose_backward_gpu.py delta_rule [--dtype bfloat16] [--K 256 --V 200 --T 300]
        [--variant wy_backward.num_warps=2 ...]

Runs the Triton training step of `chunk_<name>` twice on the same inputs (rounded to --dtype): once in that
dtype, once in float32. Every kernel launch of the backward is recorded (its tensor arguments after it ran),
and each launch's outputs in the dtype under test are compared with the float32 run's: the first kernel
whose outputs drift far more than rounding explains is the one to look at. Then the gradients of every input
against float64 autograd of naive_<name>, as the GPU tests measure them (max error / (1 + max |reference|)).
Each --variant (LAUNCH entry.setting=value, comma-separated for several) repeats the check with those
settings, so a suspected compiler problem can be confirmed or ruled out in one call. Runs under
TRITON_INTERPRET=1 on the CPU too (float16 there: the interpreter has no bfloat16 matmul).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ttr_codegen.testing import LayerChecks  # noqa: E402


class RecordedKernel:
    """Stands in for a Triton kernel: launches it, then keeps a copy of every tensor argument (its outputs)."""

    def __init__(self, name: str, kernel, log: list):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kernel[grid](*args, **kwargs)
            self.log.append((self.name, [a.detach().double().clone() if torch.is_tensor(a) else None for a in args]))
        return launch


def training_step(module, triton_module, run, dtype, state, d_out, d_final, device):
    """(gradients of every input and the initial state, the backward's recorded launches) in `dtype`."""
    log: list = []
    kernels = {name: getattr(triton_module, name) for name in dir(triton_module)
               if name.startswith("_") and name.endswith("_kernel")}
    for name, kernel in kernels.items():
        setattr(triton_module, name, RecordedKernel(name, kernel, log))
    try:
        leaves = [x.to(dtype).clone().requires_grad_(True) for x in run.args()] + [state.float().clone().requires_grad_(True)]
        chunk_module = importlib.import_module(f"{module.__name__}.chunk")
        if device.type == "cuda":
            o, final = getattr(module, f"chunk_{run.name}")(*leaves[:-1], initial_state=leaves[-1], output_final_state=True)
        else:  # the interpreter: the training path directly (the layer takes it only on CUDA)
            o, final = chunk_module._triton_train(*leaves[:-1], None, leaves[-1], True, None, 64)
        forward_launches = len(log)
        loss = (o.double() * d_out).sum() + (final.double() * d_final).sum()
        grads = torch.autograd.grad(loss, leaves)
    finally:
        for name, kernel in kernels.items():
            setattr(triton_module, name, kernel)
    return grads, log[forward_launches:]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / (1 + b.abs().max())).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--T", type=int, default=300)
    parser.add_argument("--K", type=int, default=256)
    parser.add_argument("--V", type=int, default=200)
    parser.add_argument("--variant", nargs="*", default=[])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    module = importlib.import_module(f"generated.{args.name}")
    triton_module = importlib.import_module(f"generated.{args.name}.chunk_triton")
    checks = LayerChecks(ROOT / "specs" / f"{args.name}.yaml", getattr(module, f"naive_{args.name}"), None)
    run = checks.problem(args.T, args.K, args.V, B=2, H=3, seed=args.T).to(dtype, device).to(torch.float32)
    run.name = args.name
    generator = torch.Generator(device=device).manual_seed(args.T)
    state = torch.randn(2, 3, args.K, args.V, device=device, dtype=torch.float64, generator=generator) * 0.1
    d_out = torch.randn(2, args.T, 3, args.V, device=device, dtype=torch.float64, generator=generator)
    d_final = torch.randn(2, 3, args.K, args.V, device=device, dtype=torch.float64, generator=generator)
    leaves = [x.double().clone().requires_grad_(True) for x in (*run.args(), state)]
    o, final = checks.naive(*leaves[:-1], initial_state=leaves[-1], output_final_state=True)
    expected = torch.autograd.grad((o * d_out).sum() + (final * d_final).sum(), leaves)
    names = ["q", "k", "v", *run.inputs, "initial_state"]
    print(f"{args.name} {args.dtype} B=2 T={args.T} H=3 K={args.K} V={args.V} on "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (interpreter)'}")
    default_launch = copy.deepcopy(triton_module.LAUNCH)
    for variant in ["", *args.variant]:
        triton_module.LAUNCH = copy.deepcopy(default_launch)
        for setting in filter(None, variant.split(",")):
            key, value = setting.split("=")
            entry, field = key.split(".")
            triton_module.LAUNCH[entry][field] = int(value)
        grads_32, log_32 = training_step(module, triton_module, run, torch.float32, state, d_out, d_final, device)
        grads, log = training_step(module, triton_module, run, dtype, state, d_out, d_final, device)
        print(f"-- launch {variant or 'as in LAUNCH'}")
        for (kernel, outputs), (kernel_32, outputs_32) in zip(log, log_32, strict=True):
            assert kernel == kernel_32
            drift = [f"{relative(a, b):.1e}" for a, b in zip(outputs, outputs_32) if a is not None and a.numel() > 1]
            print(f"   {kernel:22s} arguments after the launch, drift from float32: {' '.join(drift)}")
        for what, g, g_32, g_ref in zip(names, grads, grads_32, expected, strict=True):
            print(f"   d/d{what:14s} {args.dtype}: {relative(g.double(), g_ref):.2e}   float32: "
                  f"{relative(g_32.double(), g_ref):.2e}")


if __name__ == "__main__":
    main()
