"""Spec-space fuzzing: random specs over the whole schema, each either refused or right.

For every drawn spec the compiler must do one of two things:
- refuse it with diagnostics (a `SpecError`: file:line:col, what is wrong, how to fix it), or
- compile it, and then every generated op (naive, chunk, the Triton kernels under the interpreter, flash,
  the derived backward, the layer) matches the numerical oracle in float64: outputs, final states and
  gradients, with packed `cu_seqlens` and a carried state (the shared harness `ttr_codegen.testing`).

Anything else (a crash, a NaN, a difference from the oracle) is a failure. `spec_documents()` is a
hypothesis strategy; tests/test_fuzz.py runs a fixed-seed slice of it, and

    python -m ttr_codegen.fuzz --specs 500 --seed 1 --workers 2

runs a campaign: each spec is checked in a worker process (a crashing kernel cannot take the campaign
down), failures are shrunk to a minimal spec and written, with a summary, under --report.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import keyword
import os
import select
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from .spec.model import GATE_ROLES, RESERVED_INPUT_NAMES

if not torch.cuda.is_available():  # the Triton kernels run in the interpreter; set before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ---------------------------------------------------------------------------------------------
# The strategy: spec documents over the whole schema
# ---------------------------------------------------------------------------------------------

# Names that the generated code is likely to use for its own work: an input named so must still work.
# Hypothesis favours a list's first element: it is a harmless one, and these names come a quarter of the time.
_RISKY_NAMES = ["lamb", "o", "s", "t", "b", "h", "i", "j", "n", "x", "w", "u", "a", "e", "g", "gk", "beta", "exp", "log",
                "state", "states", "math", "nn", "self", "out", "decay", "gate", "scale_", "step", "kk", "vv", "qq",
                "chunk", "alpha", "eta", "theta", "ridge", "mask", "sum", "len", "range", "min", "max", "abs"]
_PLAIN_NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True)
_INPUT_NAMES = st.one_of(_PLAIN_NAMES, _PLAIN_NAMES, _PLAIN_NAMES, st.sampled_from(_RISKY_NAMES)).filter(
    lambda name: name not in RESERVED_INPUT_NAMES and not keyword.iskeyword(name))
_LAYER_NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True).filter(lambda name: not keyword.iskeyword(name))

BTH, BTHK, H_, HK = ["B", "T", "H"], ["B", "T", "H", "K"], ["H"], ["H", "K"]
_ALL_SHAPES = [BTH, BTHK, H_, HK]
# Decay shapes each linear method takes (the schema refuses the rest; the strategy sometimes tries them).
_DECAY_SHAPES = {"gradient_step_from_zero": [BTH, BTHK, H_], "online_gradient_step": [BTH, BTHK, H_],
                 "implicit_step": [BTH, BTHK, H_], "exact": [BTH, H_], "recursive_least_squares": [BTH, H_]}


class _Inputs:
    """Inputs declared while a document is drawn: each gets a fresh random name."""

    def __init__(self, draw):
        self.draw = draw
        self.declared: dict[str, dict] = {}

    def add(self, role: str, shapes: list[list[str]], stray: float = 0.05) -> str:
        """Declare an input with this role; its shape is one of `shapes`, or now and then any shape (which the
        compiler must then refuse or handle)."""
        name = self.draw(_INPUT_NAMES.filter(lambda n: n not in self.declared))
        wild = _maybe(self.draw, stray)
        shape = self.draw(st.sampled_from(_ALL_SHAPES if wild else shapes))
        self.declared[name] = {"shape": shape, "role": role}
        return name


def _maybe(draw, probability: float = 0.5) -> bool:
    # Hypothesis draws its simplest values (0, 0.0) far more often than others: let them mean "no".
    return draw(st.integers(0, 99)) >= round(100 * (1 - probability))


REGRESSOR_CLASSES = ("linear", "affine", "local_polynomial", "kernel_ridge", "mlp")


@st.composite
def spec_documents(draw) -> dict:
    """A spec document (the YAML's mapping) drawn over every class, method and option of the schema."""
    inputs = _Inputs(draw)
    document: dict = {"name": draw(_LAYER_NAMES)}
    if _maybe(draw, 0.3):
        # Printable text with the quotes and backslashes that must stay text; now and then a control character,
        # which the compiler must refuse.
        alphabet = st.one_of(st.characters(categories=("L", "N", "P", "S")), st.sampled_from(['"', "\\", '"""']))
        document["description"] = "".join(draw(st.lists(alphabet, max_size=12))) + ("\x00" if _maybe(draw, 0.05) else "")
    cls = draw(st.sampled_from(["linear"] * 6 + ["affine", "local_polynomial", "kernel_ridge", "mlp", "mlp"]))
    if cls == "linear":
        document |= _linear(draw, inputs)
    elif cls == "mlp":
        document |= _mlp(draw, inputs)
    else:
        document |= _nonparametric(draw, inputs, cls)
    if _maybe(draw, 0.3):
        document.setdefault("readout", {})["scale"] = draw(st.sampled_from(["default", 1.0, 0.5, 2]))
    if _maybe(draw, 0.3):
        document["schedule"] = {"chunk_size": draw(st.sampled_from([16, 32, 64]))}
    names = draw(st.permutations(list(inputs.declared)))  # any declaration order
    if names:
        document["inputs"] = {name: inputs.declared[name] for name in names}
    return document


def _linear(draw, inputs: _Inputs) -> dict:
    method = draw(st.sampled_from(["gradient_step_from_zero", "exact", "recursive_least_squares",
                                   "online_gradient_step", "online_gradient_step", "implicit_step", "momentum"]))
    optimiser: dict = {"method": method}
    weights: dict = {}
    readout: dict = {}
    if method in _DECAY_SHAPES and _maybe(draw, 0.6):
        weights["decay"] = inputs.add("log_decay", _DECAY_SHAPES[method])
    if method in ("gradient_step_from_zero", "exact") and _maybe(draw, 0.3):
        weights["sample_weight"] = inputs.add("sample_weight", [BTH])
    if method == "gradient_step_from_zero" and _maybe(draw, 0.2):
        readout["normalise"] = "sum"
    if method in ("online_gradient_step", "implicit_step", "momentum"):
        # An online step may take its step per key channel (a diagonal preconditioner).
        optimiser["step_size"] = inputs.add("step_size", [BTH, BTH, BTHK] if method == "online_gradient_step" else [BTH])
    if method == "online_gradient_step":
        if _maybe(draw, 0.4):
            optimiser["steps_per_token"] = draw(st.integers(1, 3))
        if "decay" not in weights and _maybe(draw, 0.4):
            role = draw(st.sampled_from(["log_decay", "forget"]))
            optimiser["weight_decay"] = inputs.add(role, [BTH])
    if method == "momentum":
        optimiser["momentum"] = inputs.add("momentum", [BTH])
        if _maybe(draw, 0.6):
            optimiser["weight_decay"] = inputs.add(draw(st.sampled_from(["log_decay", "forget"])), [BTH])
    if method == "exact":
        optimiser["ridge"] = (inputs.add("ridge", [H_, HK]) if _maybe(draw) else
                              draw(st.sampled_from([0.1, 0.5, 1.0])))
        if _maybe(draw, 0.3):
            optimiser["solver"] = _cg_solver(draw)
    if method == "recursive_least_squares":
        optimiser["ridge"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
    document = {"regressor": "linear", "optimiser": optimiser, "weights": weights or "uniform"}
    if readout:
        document["readout"] = readout
    return document


def _nonparametric(draw, inputs: _Inputs, cls: str) -> dict:
    regressor: dict = {"class": cls}
    weights: dict = {}
    optimiser: dict = {"method": "exact"}
    if cls == "local_polynomial":
        regressor["degree"] = draw(st.sampled_from([0, 0, 1, 1, 2]))
        weights["kernel"] = draw(st.sampled_from(["exp_dot", "gaussian"]))
        if weights["kernel"] == "gaussian":
            weights["bandwidth"] = draw(st.sampled_from([2.0, 4.0, 8.0]))
        if _maybe(draw, 0.3):
            weights["window"] = draw(st.integers(1, 12))
        if _maybe(draw, 0.3):
            weights["decay"] = inputs.add("log_decay", [BTH])
        if _maybe(draw, 0.25):
            weights["sample_weight"] = inputs.add("sample_weight", [BTH])
        if regressor["degree"] > 0 or _maybe(draw, 0.2):
            optimiser["ridge"] = draw(st.sampled_from([0.1, 0.5, 1.0]))
        if regressor["degree"] == 1 and _maybe(draw, 0.3):
            optimiser["solver"] = _cg_solver(draw)
    elif cls == "kernel_ridge":
        regressor["kernel"] = draw(st.sampled_from(["exp_dot", "gaussian"]))
        if regressor["kernel"] == "gaussian":
            regressor["bandwidth"] = draw(st.sampled_from([2.0, 4.0]))
        optimiser["ridge"] = draw(st.sampled_from([0.5, 1.0]))
    else:  # affine, solved exactly with global weights
        if _maybe(draw, 0.5):
            weights["decay"] = inputs.add("log_decay", [BTH])
        if _maybe(draw, 0.3):
            weights["sample_weight"] = inputs.add("sample_weight", [BTH])
        optimiser["ridge"] = inputs.add("ridge", [H_, HK]) if _maybe(draw, 0.3) else draw(st.sampled_from([0.1, 1.0]))
        if _maybe(draw, 0.3):
            optimiser["solver"] = _cg_solver(draw)
    return {"regressor": regressor, "weights": weights or "uniform", "optimiser": optimiser}


def _cg_solver(draw) -> dict:
    """A conjugate-gradient solve of the per-query system, often unconverged (fewer steps than K)."""
    return {"method": "cg", "iterations": draw(st.integers(1, 8))}


def _mlp(draw, inputs: _Inputs) -> dict:
    depth = draw(st.integers(1, 3))
    regressor: dict = {"class": "mlp", "depth": depth}
    if depth >= 2:
        regressor["hidden"] = draw(st.integers(1, 2))
        regressor["activation"] = draw(st.sampled_from(["gelu_tanh", "silu"]))
    if _maybe(draw):
        regressor["bias"] = True
    if _maybe(draw):
        regressor["residual"] = True
    if _maybe(draw, 0.4):
        regressor["layer_norm"] = {"weight": inputs.add("norm_weight", [HK]),
                                   "bias": inputs.add("norm_bias", [HK])}
    # 16 first: hypothesis's early, simplest draws then reach the Triton kernels (mini-batches of 16 to 64).
    optimiser: dict = {"method": "minibatch_gd", "batch_size": draw(st.sampled_from([16, 1, 2, 3, 4, 8, 32])),
                       "step_size": inputs.add("step_size", [BTH])}
    plain = True
    if _maybe(draw, 0.3):
        optimiser["momentum"] = inputs.add("momentum", [BTH])
        plain = False
    if _maybe(draw, 0.3):
        optimiser["weight_decay"] = inputs.add("forget", [BTH])
        plain = False
    if plain and _maybe(draw, 0.3):
        optimiser["step_size_per"] = "row"
    document = {"regressor": regressor, "optimiser": optimiser}
    if regressor.get("residual") and "layer_norm" in regressor and _maybe(draw):
        document["readout"] = {"residual": "pre_norm"}
    return document


# ---------------------------------------------------------------------------------------------
# Checking one spec
# ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What happened to one spec: 'refused', 'passed' or 'failed' (at `check`, with `error`)."""

    status: str
    structure: str = ""
    checks: list[str] = field(default_factory=list)
    check: str = ""
    error: str = ""

    @property
    def signature(self) -> str:
        """What identifies a failure when shrinking: the check and the error's first words."""
        return f"{self.check}: {self.error.split(':')[0][:60]}"


_package_counter = itertools.count()


def _import_package(directory: Path):
    """Import a generated package from `directory` under a fresh module name (its relative imports work)."""
    name = f"_ttr_fuzz_{os.getpid()}_{next(_package_counter)}"
    spec = importlib.util.spec_from_file_location(name, directory / "__init__.py",
                                                  submodule_search_locations=[str(directory)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _submodule(package, name: str):
    try:
        return importlib.import_module(f"{package.__name__}.{name}")
    except ModuleNotFoundError:
        return None


def planned_checks(package, spec) -> list[tuple[str, object]]:
    """(name, zero-argument check) for every op the package has, at sizes small enough for a fuzzing run."""
    from .testing import LayerChecks, OnlineChecks

    op = spec.name
    spec_path = Path(spec.path)
    if spec.regressor.cls == "mlp":
        checks = OnlineChecks(spec_path, getattr(package, f"naive_{op}"), getattr(package, f"chunk_{op}"),
                              getattr(package, spec.camel_name))
        return [("naive", lambda: checks.matches_oracle("naive", 11, 4)),
                ("chunk", lambda: checks.matches_oracle("chunk", 11, 4)),
                ("naive_split", lambda: checks.split_matches_oracle("naive", K=4)),
                ("chunk_split", lambda: checks.split_matches_oracle("chunk", K=4)),
                ("chunk_packed", lambda: checks.packed_sequences(lengths=(1, 9, 5), K=4)),
                ("chunk_gradients", lambda: checks.gradients_match_oracle(T=9, K=3)),
                ("layer", checks.layer_trains)] + (
            [("chunk_online_triton", lambda: checks.triton_matches_oracle(_submodule(package, "chunk"), T=37, K=16)),
             ("chunk_online_triton_training",
              lambda: checks.triton_gradients_match_oracle(_submodule(package, "chunk"), T=21, K=16,
                                                           read_out_apart=True))]
            if _submodule(package, "online_triton") is not None else []) + _context_parallel_check(package, spec_path)
    chunk = getattr(package, f"chunk_{op}", None)
    fused_module, triton_module = _submodule(package, "fused_recurrent"), _submodule(package, "chunk_triton")
    checks = LayerChecks(spec_path, getattr(package, f"naive_{op}"), getattr(package, spec.camel_name),
                         fast=getattr(package, f"flash_{op}", None), chunk=chunk,
                         fused_recurrent=getattr(fused_module, f"fused_recurrent_{op}", None),
                         backward=getattr(package, f"naive_{op}_backward", None))
    small = spec.regressor.degree == 2
    T, K, V = (7, 3, 2) if small else (9, 6, 5)
    plan = [("naive", lambda: checks.matches_oracle(T, K, V)),
            ("naive_state_carry", lambda: checks.state_carry(T=12, K=K, V=V)),
            ("naive_gradients", lambda: checks.gradients_match_oracle(T=5, K=3 if small else 4, V=2 if small else 3)),
            ("layer", lambda: checks.layer(hidden_size=12 if small else 32))]
    if checks.backward is not None:
        plan.append(("naive_backward", lambda: checks.derived_backward(T=6, K=4, V=3)))
    if checks.fast is not None:
        plan.append(("flash", lambda: checks.fast_matches_naive(20, block_size=8, K=K, V=V)))
    flash_module = _submodule(package, "flash_triton")
    if flash_module is not None:
        flash = getattr(flash_module, f"flash_{op}_triton")
        plan += [("flash_triton", lambda: checks.flash_triton_matches_oracle(flash, 20, K=K, V=V, group=2)),
                 ("flash_triton_decode", lambda: checks.flash_triton_decodes(flash, 90, K=K, V=V, group=2))]
    if chunk is not None:
        plan += [("chunk", lambda: checks.chunk_matches_oracle(37, 16, K=6, V=5)),
                 ("chunk_packed", lambda: checks.chunk_packed_sequences(lengths=(1, 17, 20), chunk_size=16)),
                 ("chunk_gradients", lambda: checks.chunk_gradients_match_oracle(T=19, K=3, V=2)),
                 ("chunk_state_gradients", lambda: checks.chunk_state_gradients(T=19, K=4, V=3))]
        # RLS decays its prior with the data: near-total forgetting makes its own problem singular.
        if any(i.role in GATE_ROLES for i in spec.inputs) and spec.optimiser.method != "recursive_least_squares":
            plan.append(("chunk_strong_gates", lambda: checks.chunk_strong_gates(T=70)))
        if _submodule(package, "cg_triton") is not None:  # the solver's steps in Triton (the GPU's path)
            chunk_module = _submodule(package, "chunk")
            plan.append(("chunk_cg_triton", lambda: checks.triton_steps_match_oracle(chunk_module, T=37, K=6, V=5)))
        if _submodule(package, "rls_triton") is not None:  # recursive least squares in Triton
            rls_chunk = _submodule(package, "chunk")
            plan.append(("chunk_rls_triton", lambda: checks.rls_triton_matches_oracle(rls_chunk, T=21, K=4, V=3)))
    if checks.fused_recurrent is not None:
        plan.append(("fused_recurrent", lambda: checks.fused_recurrent_matches_oracle(9, 6, 5)))
    if triton_module is not None:
        kernel = getattr(triton_module, f"chunk_{op}_triton")
        plan.append(("chunk_triton", lambda: checks.triton_chunk_matches_oracle(kernel, 40, 16, K=8, V=6)))
        train = getattr(_submodule(package, "chunk"), "_triton_train", None)
        if train is not None:
            plan += [("chunk_triton_backward", lambda: checks.triton_train_gradients(train, T=40, K=6, V=5)),
                     ("chunk_triton_backward_packed",
                      lambda: checks.triton_train_packed_gradients(train, lengths=(1, 17, 20), K=6, V=5))]
    return plan + _context_parallel_check(package, spec_path)


def _context_parallel_check(package, spec_path: Path) -> list[tuple[str, object]]:
    """The sequences split over two processes, where the package has `context_parallel_<name>`."""
    if _submodule(package, "context_parallel") is None:
        return []
    from .testing import context_parallel_matches

    return [("context_parallel", lambda: context_parallel_matches([(package.__path__[0], str(spec_path))], ranks=2))]


def missing_fast_paths(compiled) -> str:
    """What a compiled linear memory lacks of its fast paths ("" if nothing): every one gets the chunked PyTorch
    form, and the Triton chunked kernels with their derived backward but for the families that have none yet
    (the second-order solves, a sum-normalised read-out: docs/triton.md)."""
    from .lower import Family

    if compiled.spec.regressor.cls != "linear" or compiled.rule is None or compiled.rule.form != "recurrent":
        return ""
    if compiled.chunk is None:
        return "a linear memory without a chunked form (it would run the token loop)"
    if compiled.chunk.family == Family.SECOND_ORDER or compiled.chunk.normalised:
        return ""
    if not any(f.relative_path == "chunk_triton.py" for f in compiled.files) or compiled.adjoint is None:
        return "a linear memory without Triton chunked kernels and their backward"
    return ""


def check_document(document: dict, workdir: Path) -> Outcome:
    """Compile one spec document in `workdir` and run every check of its generated package."""
    from .pipeline import compile_spec
    from .render.hygiene import unused_imports, unused_locals
    from .render.wrap import long_lines
    from .render.writer import plan_changes, write_atomically
    from .spec import SpecError, load_spec

    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(document, sort_keys=False))
    try:
        compiled = compile_spec(spec_path, workdir / "out")
    except SpecError as error:
        return Outcome("refused", error=str(error).splitlines()[0])
    except Exception as error:  # noqa: BLE001 -- a crash is exactly what the fuzzer reports
        return Outcome("failed", check="compile", error=_summary(error))
    missing = missing_fast_paths(compiled)
    if missing:
        return Outcome("failed", str(compiled.structure), check="fast_path", error=missing)
    # The stamp's three lines name the spec's path, which is the caller's (a temporary folder here): not counted.
    long = [f"{f.relative_path}:{n + 3}" for f in compiled.files if f.relative_path.endswith(".py")
            for n in long_lines(f.text.split("\n", 3)[-1])]
    if long:  # generated code reads like hand-written code: code and prose wrapped at 120 characters
        return Outcome("failed", str(compiled.structure), check="line_length", error=", ".join(long[:5]))
    unused = [f"{f.relative_path}: {name}" for f in compiled.files
              if f.relative_path.endswith(".py") and not f.relative_path.endswith("__init__.py")
              for name in unused_imports(f.text)]
    if unused:  # nor names imported and never read
        return Outcome("failed", str(compiled.structure), check="unused_imports", error=", ".join(unused[:5]))
    unread = [f"{f.relative_path}: {name}" for f in compiled.files if f.relative_path.endswith(".py")
              for name in unused_locals(f.text)]
    if unread:  # nor values computed and never read
        return Outcome("failed", str(compiled.structure), check="unused_locals", error=", ".join(unread[:5]))
    try:
        write_atomically(plan_changes(compiled.package_dir, compiled.files), force=True)
        package = _import_package(compiled.package_dir)
        plan = planned_checks(package, load_spec(spec_path))
    except Exception as error:  # noqa: BLE001
        return Outcome("failed", str(compiled.structure), check="import", error=_summary(error))
    done = []
    for name, run in plan:
        try:
            run()
        except Exception as error:  # noqa: BLE001
            return Outcome("failed", str(compiled.structure), done, name, _summary(error))
        done.append(name)
    return Outcome("passed", str(compiled.structure), done)


def _summary(error: BaseException) -> str:
    last = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
    where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{where}"


# ---------------------------------------------------------------------------------------------
# Campaigns: draw, check in worker processes, shrink
# ---------------------------------------------------------------------------------------------


def _regressor_class(document: dict) -> str:
    regressor = document["regressor"]
    return regressor if isinstance(regressor, str) else regressor["class"]


def draw_documents(count: int, seed: int, regressor: str | None = None) -> list[dict]:
    """`count` distinct spec documents (of one regressor class, if given), the same for the same seed (and
    hypothesis version)."""
    found: list[dict] = []

    # A class drawn a few times in ten needs more draws to fill the count.
    @settings(max_examples=3 * count * (1 if regressor is None else 10), database=None, phases=[Phase.generate],
              deadline=None, suppress_health_check=list(HealthCheck))
    @hypothesis_seed(seed)
    @given(spec_documents())
    def collect(document):
        if len(found) < count and document not in found and regressor in (None, _regressor_class(document)):
            found.append(document)  # (hypothesis repeats some examples)

    collect()
    return found[:count]


def spread_slice(count: int, seed: int) -> list[dict]:
    """`count` documents across the schema: drawn from a larger pool, one (regressor class, optimiser) pair after
    another, so a short run covers what hypothesis's first, simplest examples would leave out."""
    groups: dict[tuple, list[dict]] = {}
    for document in draw_documents(8 * count, seed):
        key = (_regressor_class(document), document["optimiser"]["method"])
        groups.setdefault(key, []).append(document)
    chosen: list[dict] = []
    while len(chosen) < count and any(groups.values()):
        for key in sorted(groups):
            if groups[key] and len(chosen) < count:
                chosen.append(groups[key].pop(0))
    return chosen


class _Worker:
    """A child process that checks documents one at a time; a crash (even a segfault) ends only it."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.process = subprocess.Popen([sys.executable, "-m", "ttr_codegen.fuzz", "--worker", str(workdir)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def check(self, document: dict, timeout: float) -> Outcome:
        self.process.stdin.write(json.dumps(document) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            self.process.kill()
            self.process.wait()
            return Outcome("failed", check="process", error=f"no answer within {timeout:.0f} s")
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            return Outcome("failed", check="process", error=f"worker died with exit code {code}")
        return Outcome(**json.loads(line))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)


def _worker_loop(workdir: Path) -> None:
    for index, line in enumerate(sys.stdin):
        outcome = check_document(json.loads(line), workdir / str(index))
        sys.stdout.write(json.dumps(asdict(outcome)) + "\n")
        sys.stdout.flush()


TIMEOUT = 900.0  # seconds one spec's checks may take in a campaign


def _check_in_worker(document: dict, workdir: Path) -> Outcome:
    worker = _Worker(workdir)
    try:
        return worker.check(document, TIMEOUT)
    finally:
        worker.close()


def shrink(document: dict, outcome: Outcome, check, budget: int = 60) -> dict:
    """Greedily simplify a failing document while it still fails the same way (same signature)."""
    evaluations = 0
    improved = True
    while improved and evaluations < budget:
        improved = False
        for candidate in _simpler(document):
            evaluations += 1
            if check(candidate).signature == outcome.signature:
                document, improved = candidate, True
                break
            if evaluations >= budget:
                break
    return document


def _simpler(document: dict):
    """Candidate simplifications of a document, most drastic first."""
    def without_input(doc: dict, name: str) -> dict:
        doc = copy.deepcopy(doc)
        doc.get("inputs", {}).pop(name, None)
        if not doc.get("inputs"):
            doc.pop("inputs", None)
        return doc

    for key in ("description", "readout", "schedule"):
        if key in document:
            yield {k: v for k, v in document.items() if k != key}
    for section in ("weights", "optimiser", "regressor"):
        body = document.get(section)
        if not isinstance(body, dict):
            continue
        for key, value in body.items():
            if key in ("method", "class"):
                continue
            candidate = copy.deepcopy(document)
            del candidate[section][key]
            if section == "weights" and not candidate[section]:
                candidate[section] = "uniform"
            for name in (value.values() if isinstance(value, dict) else [value]):
                if isinstance(name, str) and name in document.get("inputs", {}):
                    candidate = without_input(candidate, name)
            yield candidate
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                candidate = copy.deepcopy(document)
                candidate[section][key] = 1 if key != "degree" else value - 1
                yield candidate
    for index, (name, declared) in enumerate(document.get("inputs", {}).items()):
        if declared.get("shape") != BTH and declared.get("role") not in ("norm_weight", "norm_bias", "ridge"):
            candidate = copy.deepcopy(document)
            candidate["inputs"][name]["shape"] = BTH
            yield candidate
        plain = f"x{index}"
        if name != plain and plain not in document.get("inputs", {}):
            yield _renamed(document, name, plain)
    if document.get("name") != "layer":
        yield {**document, "name": "layer"}


_REFERENCE_KEYS = ("decay", "sample_weight", "step_size", "weight_decay", "momentum", "ridge", "weight", "bias")


def _renamed(document: dict, old: str, new: str) -> dict:
    """The document with input `old` renamed to `new`: its declaration and every reference to it."""
    def rename(node):
        if not isinstance(node, dict):
            return node
        return {key: (new if key in _REFERENCE_KEYS and value == old else rename(value)) for key, value in node.items()}

    renamed = {key: rename(value) if key in ("weights", "optimiser", "regressor") else value
               for key, value in document.items()}
    renamed["inputs"] = {(new if name == old else name): declared for name, declared in document["inputs"].items()}
    return renamed


def campaign(count: int, seed: int, workers: int, report: Path, shrink_budget: int,
             regressor: str | None = None) -> dict:
    """Check `count` drawn specs in `workers` processes; shrink each new kind of failure; write the report."""
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    documents = draw_documents(count, seed, regressor)
    report.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="ttr-fuzz-"))
    outcomes: list[Outcome | None] = [None] * len(documents)

    def run_share(share: int) -> None:
        worker = _Worker(scratch / f"worker{share}")
        for index in range(share, len(documents), workers):
            outcome = worker.check(documents[index], TIMEOUT)
            if outcome.check == "process":  # the worker died: record it, start another
                worker = _Worker(scratch / f"worker{share}-{index}")
            outcomes[index] = outcome
            print(f"[{index + 1}/{len(documents)}] {outcome.status:8} {outcome.structure:22} "
                  f"{outcome.signature if outcome.status == 'failed' else ''}", flush=True)
        worker.close()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run_share, range(workers)))
    counts = Counter(o.status for o in outcomes)
    failures = {}
    for document, outcome in zip(documents, outcomes):
        if outcome.status == "failed" and outcome.signature not in failures:
            minimal = shrink(document, outcome, lambda d: _check_in_worker(d, scratch / "shrink"), shrink_budget)
            failures[outcome.signature] = {"error": outcome.error, "document": document, "minimal": minimal}
            name = f"failure{len(failures)}.yaml"
            (report / name).write_text(f"# {outcome.signature}\n# {outcome.error}\n"
                                       + yaml.safe_dump(minimal, sort_keys=False))
    summary = {"seed": seed, "regressor": regressor or "any", "specs": len(documents), "compiled": counts["passed"] + counts["failed"],
               "refused": counts["refused"], "passed": counts["passed"], "failed": counts["failed"],
               "failure_kinds": {s: f["error"] for s, f in failures.items()},
               "structures": dict(Counter(o.structure for o in outcomes if o.status != "refused")),
               "refusals": dict(Counter(o.error.split(": error: ")[-1][:80] for o in outcomes
                                        if o.status == "refused").most_common(15)),
               "seconds": round(time.perf_counter() - start, 1)}
    (report / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (report / "outcomes.jsonl").write_text("".join(json.dumps({"document": d, **asdict(o)}) + "\n"
                                                   for d, o in zip(documents, outcomes)))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ttr_codegen.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", type=int, default=100, help="how many specs to draw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--report", type=Path, default=Path("fuzz-report"), help="folder for the summary and failures")
    parser.add_argument("--shrink-budget", type=int, default=40, help="checks spent shrinking each kind of failure")
    parser.add_argument("--regressor", choices=REGRESSOR_CLASSES, help="draw only specs of this regressor class")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        _worker_loop(args.worker)
        return 0
    summary = campaign(args.specs, args.seed, args.workers, args.report, args.shrink_budget, args.regressor)
    print(json.dumps(summary, indent=2))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
