"""What each generated Triton kernel asks of an H100, found without one: registers, local memory and shared
memory of every kernel a training step launches (and, for attention layers, decoding; for nonlinear memories, a
training step through their Triton kernels; for conjugate-gradient solves, a training step and an inference call;
for recursive least squares, a training step),
compiled for sm_90a by the installed Triton.

    python benchmarks/kernel_resources.py [layer ...] [--K 128 --V 100] [--dtype float32 bfloat16]

A kernel that spills keeps its spilled values in local memory, and the driver reserves local memory for
every thread the GPU can hold at once (2048 per SM, 132 SMs): 1 KiB of stack per thread costs about 264 MiB
per process, whatever the kernel's grid. "local MiB" is that reservation; "barriers" counts the barriers in
the kernel's code (`barriers`). Matches the device where the
installed Triton is the device's version (3.6 on our H100s; `pip install triton==3.6.0` in a virtual
environment to check against it).

How: a child process runs the layer's Triton training step under the interpreter and records each launch's
arguments (without running the kernels); this process compiles each distinct specialization for sm_90a.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

THREADS_PER_GPU = 2048 * 132  # resident threads of an H100 SXM: what the local memory is reserved for
TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int32": "i32", "int64": "i64"}


def record_launches(name: str, K: int, V: int, dtype: str, T: int = 130) -> list:
    """(module, kernel, {argument: ["tensor", dtype] or ["value", v]}) of every launch of a forward and
    backward of chunk_<name> on the Triton path. Runs under TRITON_INTERPRET=1 with the launches stubbed."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    from ttr_codegen.testing import LayerChecks, rls_kernel_settings

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        values = dict(zip(self.arg_names, args)) | kwargs
        launches.append([self.fn.__module__, self.fn.__name__, {
            k: ["tensor", str(v.dtype).removeprefix("torch.")] if isinstance(v, torch.Tensor) else ["value", v]
            for k, v in values.items()}])

    package = importlib.import_module(f"generated.{name}")
    checks = LayerChecks(ROOT / "specs" / f"{name}.yaml", getattr(package, f"naive_{name}"), None)
    if (ROOT / "generated" / name / "flash_triton.py").exists():  # attention: a training step, then decoding
        kernel = getattr(importlib.import_module(f"generated.{name}.flash_triton"), f"flash_{name}_triton")
        problem = checks.problem(T, K, V, B=1, H=2, seed=0)
        InterpretedFunction.run = record
        leaves = _leaves(problem, dtype)
        if hasattr(kernel_module := sys.modules[kernel.__module__], "_backward"):
            o, _ = kernel(*leaves)
            torch.autograd.grad(o.float().sum(), leaves)
        with torch.no_grad():  # the forward alone where the kernels have no backward (local-linear's CG)
            if not hasattr(kernel_module, "_backward"):
                kernel(*leaves)
            last = [x[:, -1:].detach() for x in leaves]
            kernel(*last, initial_state=tuple(x[:, :-1].detach() for x in leaves[1:]))
        return launches
    if (ROOT / "generated" / name / "online_triton.py").exists():  # a nonlinear memory: training, then inference
        from ttr_codegen.testing import OnlineChecks, online_kernels_forced

        chunk = importlib.import_module(f"generated.{name}.chunk")
        online = OnlineChecks(ROOT / "specs" / f"{name}.yaml", None, getattr(package, f"chunk_{name}"), None)
        problem, initial = online.problem(T, K, B=1, H=2, seed=0)
        InterpretedFunction.run = record
        leaves = _leaves(problem, dtype)
        state = tuple(x.float() for x in initial)
        with online_kernels_forced(chunk):
            o, _ = online.chunk(*leaves, initial_state=state)  # a training step
            torch.autograd.grad(o.float().sum(), leaves)
        # Inference with the read-out apart (the walk without it, then the read-out).
        with online_kernels_forced(chunk, read_out_apart=True), torch.no_grad():
            online.chunk(*leaves, initial_state=state)
        return launches
    if (ROOT / "generated" / name / "rls_triton.py").exists():  # recursive least squares: a training step each way
        chunk = importlib.import_module(f"generated.{name}.chunk")
        rls_triton = importlib.import_module(f"generated.{name}.rls_triton")
        chunk._rls_in_triton = lambda *args: True
        problem = checks.problem(T, K, V, B=1, H=2, seed=0)
        InterpretedFunction.run = record
        leaves = _leaves(problem, dtype)
        # By chunks (the token loop past CHUNK_KEYS) with their gains by each way, unrolled and running; token by
        # token.
        for setting in ("chunks:chunks", "chunks:chunks:columns", "chunks:chunks:warps",
                        "chunks:chunks:rows:16:tf32x3:running", "chunks:chunks:warps:16:tf32x3:running",
                        "tokens:tokens"):
            vars(rls_triton).update(rls_kernel_settings(setting))
            o, _ = getattr(chunk, f"chunk_{name}")(*leaves)
            torch.autograd.grad(o.float().sum(), leaves)
        return launches
    if (ROOT / "generated" / name / "cg_triton.py").exists():  # conjugate-gradient steps: a training step, then inference
        chunk = importlib.import_module(f"generated.{name}.chunk")
        chunk._steps_in_triton = lambda *args: True
        problem = checks.problem(T, K, V, B=1, H=2, seed=0)
        InterpretedFunction.run = record
        leaves = _leaves(problem, dtype)
        op = getattr(chunk, f"chunk_{name}")
        o, _ = op(*leaves)
        torch.autograd.grad(o.float().sum(), leaves)
        with torch.no_grad():
            op(*leaves)
        return launches
    parts = checks.state_parts()  # e.g. Titans' (S, Z)
    problem = checks.problem(T, K, V, B=1, H=1, seed=0)
    InterpretedFunction.run = record  # the step's values are garbage from here on; only the launches matter
    chunk = importlib.import_module(f"generated.{name}.chunk")
    leaves = _leaves(problem, dtype)
    states = [torch.zeros(1, 1, K, V, requires_grad=True) for _ in range(parts)]
    o, final = chunk._triton_train(*leaves, None, tuple(states) if parts > 1 else states[0], True, None, 64)
    final = final if isinstance(final, tuple) else (final,)
    torch.autograd.grad(o.float().sum() + sum(f.sum() for f in final), [*leaves, *states], allow_unused=True)
    return launches


def _leaves(problem, dtype: str) -> list:
    """The problem's tensors as a step's leaves: q, k, v in `dtype`, the spec's inputs in float32."""
    import torch  # as record_launches: only its child process (the interpreter's) imports torch

    return [x.to(getattr(torch, dtype) if i < 3 else torch.float32).requires_grad_(True)
            for i, x in enumerate(problem.args())]


def cubin_resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread of a compiled kernel, from cuobjdump (bundled with Triton)."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.cubin").write_bytes(cubin)
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f"{tmp}/k.cubin"],
                               capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return int(found.group(1)), int(found.group(2))


def compile_for_hopper(module: str, kernel: str, arguments: dict):
    """The compiled kernel of one recorded launch, for sm_90a."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = getattr(importlib.import_module(module), kernel)
    signature, constants, attributes = {}, {}, {}
    for i, param in enumerate(jit.params):
        kind, value = arguments[param.name]
        if param.is_constexpr or value is None:
            signature[param.name], constants[param.name] = "constexpr", value
        elif kind == "tensor":
            signature[param.name] = "*" + TYPES[value]
            attributes[(i,)] = [["tt.divisibility", 16]]  # as the launcher specialises aligned pointers
        elif kind == "signature":  # given whole, e.g. a tensor descriptor's "tensordesc<fp32[64, 64]>"
            signature[param.name] = value
        else:
            signature[param.name] = "fp32" if isinstance(value, float) else "i32"
    options = {k: v for k, (_, v) in arguments.items() if k not in jit.arg_names}  # num_warps, num_stages
    source = ASTSource(jit, signature, constants, attributes)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options), options


def label(kernel: str, arguments: dict, launches: list) -> str:
    """The kernel's name, with the text settings that tell its launches apart (e.g. "_chunk_forward_kernel columns")."""
    varying = [key for key, value in arguments.items() if isinstance(value[1], str)
               and any(other[1] == kernel and other[2].get(key) != value for other in launches)]
    return " ".join([kernel] + [arguments[key][1] for key in varying])


def barriers(ptx: str) -> int:
    """The barriers written in a kernel's PTX (each loop body's once; static_range loops are unrolled): where a
    program's work is one long chain, as in a walk over a sequence, each is a wait of all its warps."""
    return len(re.findall(r"\b(?:bar|barrier)\.sync\b", ptx))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("layers", nargs="*")
    parser.add_argument("--K", type=int, default=128)
    parser.add_argument("--V", type=int, default=100)
    parser.add_argument("--dtype", nargs="*", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--ir", default=None,
                        help="also write each kernel's Triton GPU IR and PTX into this folder (to read how the "
                             "compiler laid it out: pipelined loads, MMA versions, layout conversions)")
    parser.add_argument("--record", action="store_true", help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args()
    if args.record:
        print(json.dumps(record_launches(args.layers[0], args.K, args.V, args.dtype[0])))
        return
    import triton

    from ttr_codegen.testing import triton_trained_layers

    print(f"sm_90a, Triton {triton.__version__}, K={args.K} V={args.V}, a training step (forward and backward)")
    print(f"{'layer':20s} {'dtype':9s} {'kernel':30s} {'regs':>5s} {'stack B':>8s} {'shared B':>9s} "
          f"{'warps':>5s} {'stages':>6s} {'local MiB':>9s} {'barriers':>8s}")
    attention = sorted(p.parent.name for p in (ROOT / "generated").glob("*/flash_triton.py"))
    online = sorted(p.parent.name for p in (ROOT / "generated").glob("*/online_triton.py"))
    for name in args.layers or triton_trained_layers(ROOT / "generated") + attention + online:
        for dtype in args.dtype:
            child = subprocess.run([sys.executable, __file__, name, "--record", "--K", str(args.K), "--V", str(args.V),
                                    "--dtype", dtype], capture_output=True, text=True,
                                   env=os.environ | {"TRITON_INTERPRET": "1"})
            if child.returncode:
                print(f"{name:20s} {dtype:9s} recording failed:\n{child.stderr[-2000:]}")
                continue
            launches = json.loads(child.stdout.splitlines()[-1])
            seen = set()
            for module, kernel, arguments in launches:
                key = json.dumps([kernel, arguments], sort_keys=True)
                if key in seen:  # the backward recomputes the forward's kernels with the same arguments
                    continue
                seen.add(key)
                if dtype == "bfloat16" and arguments.get("STATE_DOT") == ["value", "tf32x3"]:
                    # The nonlinear memories' forward on a GPU (their CPU runs, recorded here, take TF32x3).
                    arguments["STATE_DOT"] = ["value", "bf16x3"]
                compiled, options = compile_for_hopper(module, kernel, arguments)
                registers, stack = cubin_resources(compiled.asm["cubin"])
                if args.ir:
                    folder = Path(args.ir)
                    folder.mkdir(parents=True, exist_ok=True)
                    stem = f"{name}-{dtype}-{kernel}-{len(seen)}"
                    (folder / f"{stem}.ttgir").write_text(compiled.asm["ttgir"])
                    (folder / f"{stem}.ptx").write_text(compiled.asm["ptx"])
                print(f"{name:20s} {dtype:9s} {label(kernel, arguments, launches):30s} {registers:5d} {stack:8d} "
                      f"{compiled.metadata.shared:9d} {options.get('num_warps', 4):5d} {options.get('num_stages', 3):6d} "
                      f"{stack * THREADS_PER_GPU / 2**20:9.0f} {barriers(compiled.asm['ptx']):8d}", flush=True)


if __name__ == "__main__":
    main()
