"""The shared harness behind every generated test: generated code checked against the spec's oracle.

Generated `test_<name>.py` files stay a few lines long; the checks live here, once, and are tested
themselves in tests/test_harness.py (a deliberately wrong layer must fail them).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import interpreter, oracle
from .spec import Spec, load_spec
from .spec.model import GATE_ROLES

interpreter.speed_up()  # generated packages' tests anywhere: without a GPU their kernels run in the interpreter

# A typical value of each input role, from a standard normal draw x (ridges from a uniform draw).
_TYPICAL_VALUE = {
    "log_decay": lambda x, generator: F.logsigmoid(x + 3.0),
    "step_size": lambda x, generator: torch.sigmoid(x),
    "sample_weight": lambda x, generator: torch.sigmoid(x),
    "forget": lambda x, generator: torch.sigmoid(x - 2.0),
    "momentum": lambda x, generator: torch.sigmoid(x),
    "ridge": lambda x, generator: 0.5 + torch.rand(x.shape, generator=generator, dtype=x.dtype),
    "norm_weight": lambda x, generator: 1 + 0.2 * x,
    "norm_bias": lambda x, generator: 0.2 * x,
}

# `OnlineChecks.problem(calm=True)`: a nonlinear memory's rates scaled so that it neither diverges nor forgets
# itself to zero over thousands of tokens (a network's gradients vanish with its weights).
_CALMER = {"step_size": 0.1, "forget": 0.01}

# Gates that forget almost everything: log-decays from about -0.1 down to -100 per token, forgetting
# fractions near 1, momentum near 0 (for the chunked forms' overflow and underflow checks).
_STRONG_GATE = {
    "log_decay": lambda x, generator: -torch.exp(2.0 * x + 1.5).clamp(max=100.0),
    "forget": lambda x, generator: torch.sigmoid(x + 6.0),
    "momentum": lambda x, generator: torch.sigmoid(x - 6.0),
}
assert set(_STRONG_GATE) == set(GATE_ROLES)

_INPUT_SHAPES = {("B", "T", "H"): "BTH", ("B", "T", "H", "K"): "BTHK", ("H",): "H", ("H", "K"): "HK"}


def _tolerance(dtype: torch.dtype) -> dict:
    return {"atol": 1e-9, "rtol": 1e-8} if dtype == torch.float64 else {"atol": 2e-4, "rtol": 2e-4}


def _at_scale(tolerance: dict, reference: torch.Tensor) -> dict:
    """tolerance with its absolute part taken relative to the reference's largest entry (where that is above 1):
    a memory that grows large rounds its small entries at the scale of its large ones, whose sums cancel into
    them (a diverging three-layer memory's weights of 4e15 carry rounding of 1e-6 into entries near 1)."""
    scale = max(1.0, reference.abs().max().item()) if reference.numel() else 1.0
    return {**tolerance, "atol": tolerance["atol"] * scale}


def assert_within(o: torch.Tensor, o_ref: torch.Tensor, relative: float, what: str) -> None:
    """Max error of o against o_ref at most `relative` * (1 + max |o_ref|)."""
    bound = relative * (1 + o_ref.abs().max().item())
    error = (o.double() - o_ref).abs().max().item()
    assert error <= bound, f"{what}: max error {error:.3g} above bound {bound:.3g}"


@dataclass
class Problem:
    """One set of random inputs for a spec, laid out as the generated op takes them."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    inputs: dict[str, torch.Tensor]

    def args(self) -> tuple:
        return (self.q, self.k, self.v, *self.inputs.values())

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Problem:
        return Problem(self.q.to(device, dtype), self.k.to(device, dtype), self.v.to(device, dtype),
                       {n: x.to(device, dtype) for n, x in self.inputs.items()})

    def row(self, b: int, spec: Spec) -> Problem:
        """Batch row b alone (B = 1); per-head inputs are kept whole."""
        return Problem(self.q[b:b + 1], self.k[b:b + 1], self.v[b:b + 1],
                       {n: (x[b:b + 1] if spec.input(n).per_token else x) for n, x in self.inputs.items()})

    def tokens(self, start: int, stop: int, steps: int, per_step: set[str], spec: Spec) -> Problem:
        """The slice of tokens [start, stop) (rows start*steps .. stop*steps for per-step tensors)."""
        def cut(x, per_step_row):
            return x[:, start * steps:stop * steps] if per_step_row else x[:, start:stop]
        inputs = {}
        for name, x in self.inputs.items():
            inputs[name] = cut(x, name in per_step) if spec.input(name).per_token else x
        return Problem(self.q[:, start:stop], cut(self.k, True), cut(self.v, True), inputs)


def triton_trained_layers(generated: Path) -> list[str]:
    """The layers under `generated` (an importable package) whose chunked form trains on the Triton backward
    kernels on CUDA: their chunk module has the training entry `_triton_train`."""
    import importlib

    return sorted(p.parent.name for p in generated.glob("*/chunk.py")
                  if hasattr(importlib.import_module(f"{generated.name}.{p.parent.name}.chunk"), "_triton_train"))


def share_per_head_inputs(problems: list[Problem], spec: Spec) -> list[Problem]:
    """The problems with the first one's per-head inputs (packed sequences share them), changed in place."""
    for p in problems[1:]:
        p.inputs.update({n: x for n, x in problems[0].inputs.items() if not spec.input(n).per_token})
    return problems


def pack(problems: list[Problem], spec: Spec) -> tuple[Problem, torch.Tensor]:
    """Concatenate B = 1 problems along T (per-head inputs are taken from the first) and their cu_seqlens."""
    q, k, v = (torch.cat(parts, dim=1) for parts in zip(*(p.args()[:3] for p in problems)))
    inputs = {name: (torch.cat([p.inputs[name] for p in problems], dim=1) if spec.input(name).per_token else x)
              for name, x in problems[0].inputs.items()}
    lengths = torch.tensor([p.q.shape[1] for p in problems])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(q.device)
    return Problem(q, k, v, inputs), cu_seqlens


def naive_per_sequence(naive, args, initial, cu_seqlens: torch.Tensor):
    """A packed problem's (output, final states) from `naive` run on each sequence from its own initial state (a
    tensor, or a tuple of one per state part; per-token tensors are cut along T, per-sub-step ones along
    T * sub-steps; per-head ones are shared)."""
    total = args[0].shape[1]

    def cut(x, start, stop):
        if x.dim() < 2 or x.shape[1] % total:
            return x
        rows = x.shape[1] // total  # sub-steps per token
        return x[:, start * rows:stop * rows]

    outputs, finals = [], []
    for i, (start, stop) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        o, final = naive(*(cut(x, start, stop) for x in args), initial_state=_row(initial, i), output_final_state=True)
        outputs.append(o)
        finals.append(state_tuple(final))
    return torch.cat(outputs, dim=1), _join(finals)


class TwoLayers(torch.nn.Module):
    """A residual stack of two generated layers (their classes), for checks of a whole model."""

    def __init__(self, first: type[torch.nn.Module], second: type[torch.nn.Module], width: int = 32, heads: int = 2):
        super().__init__()
        self.first = first(width, heads)
        self.second = second(width, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.first(x)[0]
        return x + self.second(x)[0]


def compiled_matches_eager(model: torch.nn.Module, x: torch.Tensor, relative: float, **compile_options) -> None:
    """torch.compile(model, fullgraph=True) (raising on any graph break): one forward and backward of a mean
    square loss give eager's output and parameter gradients (within `relative`, see assert_within), and every
    gradient is finite and non-zero."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, **compile_options)
    out = compiled(x)
    out.square().mean().backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x)
    eager.square().mean().backward()
    assert_within(out, eager, relative, "output")
    for (name, p), g in zip(model.named_parameters(), compiled_grads, strict=True):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
        assert_within(g, p.grad, relative, f"d/d{name}")


def state_tuple(state) -> tuple:
    """A layer's state as a tuple of its tensors: one for most layers, several where it carries more (Titans' (S, Z))."""
    return state if isinstance(state, tuple) else (state,)


def _join(per_sequence: list[tuple]):
    """Stack the states of several sequences along the batch (a tensor, or a tuple of tensors)."""
    joined = tuple(torch.cat(parts) for parts in zip(*per_sequence))
    return joined if len(joined) > 1 else joined[0]


def _row(state, i: int):
    return tuple(s[i:i + 1] for s in state) if isinstance(state, tuple) else state[i:i + 1]


class LayerChecks:
    """Checks one generated layer (`naive_<name>` and its module) against the oracle of its spec."""

    # (T, K, V): a single token, a prime length, K != V, and K = 60 (not a power of two).
    ORACLE_SHAPES = [(1, 8, 8), (63, 16, 12), (100, 12, 20), (20, 60, 8)]
    # Degree-2 local polynomials have O(K^2) features per query: small K.
    SMALL_K_SHAPES = [(1, 3, 3), (63, 4, 3), (100, 3, 5)]

    def __init__(self, spec_path: Path, naive, layer_class, fast=None, chunk=None, fused_recurrent=None, backward=None):
        self.spec = load_spec(spec_path)
        self.backward = backward  # naive_<name>_backward: the derived adjoint as a reverse token loop
        self.fused_recurrent = fused_recurrent  # the Triton decoding kernel (forward only)
        self.fast = fast  # an optional faster op with the same contract (e.g. flash_<name>)
        self.chunk = chunk  # chunk_<name>: the naive contract plus cu_seqlens and chunk_size
        self.naive = naive
        self.layer_class = layer_class
        self.steps = self.spec.optimiser.steps_per_token
        self.per_step = {self.spec.optimiser.step_size} if self.steps > 1 else set()

    @property
    def oracle_shapes(self) -> list[tuple[int, int, int]]:
        return self.SMALL_K_SHAPES if self.spec.regressor.degree == 2 else self.ORACLE_SHAPES

    # --- inputs -------------------------------------------------------------------------------
    def problem(self, T: int, K: int, V: int, B: int = 2, H: int = 2, seed: int = 0,
                dtype: torch.dtype = torch.float64) -> Problem:
        generator = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float64)

        n = self.steps
        q = randn(B, T, H, K)
        k = F.normalize(randn(B, T * n, H, K), dim=-1)  # unit keys keep every memory update stable
        v = randn(B, T * n, H, V)
        inputs = {}
        for spec_input in self.spec.inputs:
            rows = T * n if spec_input.name in self.per_step else T
            shape = {"BTH": (B, rows, H), "BTHK": (B, rows, H, K), "H": (H,), "HK": (H, K)}[
                _INPUT_SHAPES[spec_input.shape]]
            x = randn(*shape)
            inputs[spec_input.name] = _TYPICAL_VALUE[spec_input.role](x, generator)
        return Problem(q, k, v, inputs).to(dtype)

    def oracle(self, problem: Problem, scale: float | None = None):
        return oracle.solve(self.spec, problem.q, problem.k, problem.v, problem.inputs, scale)

    def per_token_inputs(self, inputs: dict) -> list[torch.Tensor]:
        """The inputs that vary per token (gates, step sizes; per key too for GLA): what a training step
        differentiates besides q, k and v (per-head constants are left out)."""
        return [x for name, x in inputs.items() if self.spec.input(name).per_token]

    def memory(self, state, problem: Problem) -> torch.Tensor:
        return oracle.memory_of_state(self.spec, state, problem.inputs)

    # --- checks -------------------------------------------------------------------------------
    def matches_oracle(self, T: int, K: int, V: int) -> None:
        """Outputs and final memory equal the oracle's in float64, with the default and a custom scale."""
        problem = self.problem(T, K, V)
        for scale in (None, 0.37):
            o, state = self.naive(*problem.args(), scale=scale, output_final_state=True)
            o_ref, memory_ref = self.oracle(problem, scale)
            assert o.dtype == torch.float64 and o.shape == o_ref.shape
            torch.testing.assert_close(o, o_ref, **_tolerance(torch.float64))
            torch.testing.assert_close(self.memory(state, problem), memory_ref, **_tolerance(torch.float64))

    def state_carry(self, T: int = 24, K: int = 6, V: int = 5) -> None:
        """Running [0:T] equals [0:T/2] then [T/2:T] from the carried state, and both equal the oracle."""
        problem = self.problem(T, K, V, seed=1)
        half = T // 2 + 1
        first, second = (problem.tokens(0, half, self.steps, self.per_step, self.spec),
                         problem.tokens(half, T, self.steps, self.per_step, self.spec))
        o_full, state_full = self.naive(*problem.args(), output_final_state=True)
        o_1, state_1 = self.naive(*first.args(), output_final_state=True)
        o_2, state_2 = self.naive(*second.args(), initial_state=state_1, output_final_state=True)
        torch.testing.assert_close(torch.cat([o_1, o_2], dim=1), o_full, **_tolerance(torch.float64))
        o_ref, memory_ref = self.oracle(problem)
        torch.testing.assert_close(torch.cat([o_1, o_2], dim=1), o_ref, **_tolerance(torch.float64))
        torch.testing.assert_close(self.memory(state_2, problem), memory_ref, **_tolerance(torch.float64))
        _, no_state = self.naive(*problem.args())
        assert no_state is None

    def gradients_match_oracle(self, T: int = 7, K: int = 4, V: int = 3) -> None:
        """d(loss)/d(every input) through the generated op equals the gradient through the oracle."""
        problem = self.problem(T, K, V, B=1, seed=2)
        leaves = [x.clone().requires_grad_(True) for x in problem.args()]
        weights = torch.randn(1, T, 2, V, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        o, _ = self.naive(*leaves)
        grads = torch.autograd.grad((o * weights).sum(), leaves)
        leaves_ref = [x.clone().requires_grad_(True) for x in problem.args()]
        names = list(problem.inputs)
        o_ref, _ = oracle.solve(self.spec, *leaves_ref[:3], dict(zip(names, leaves_ref[3:])))
        grads_ref = torch.autograd.grad((o_ref * weights).sum(), leaves_ref)
        for name, g, g_ref in zip(["q", "k", "v", *names], grads, grads_ref):
            torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=1e-7, msg=lambda m, name=name: f"d/d{name}: {m}")

    def state_parts(self) -> int:
        """How many tensors the layer's state holds (2 for Titans' (S, Z)), as its naive op returns it."""
        _, final = self.naive(*self.problem(2, 4, 3, B=1, seed=0).args(), output_final_state=True)
        return len(state_tuple(final))

    def _with_states(self, T: int, K: int, V: int, seed: int):
        """A problem with a random initial state and random gradients for the output and the final state:
        (problem, state parts, output gradient, final-state gradient parts, whether the state is a tuple)."""
        problem = self.problem(T, K, V, seed=seed)
        generator = torch.Generator().manual_seed(seed + 1)
        carried = self.run_end_state(problem, K, V, seed=seed + 2)
        several = isinstance(carried, tuple)  # e.g. Titans' (S, Z)
        parts = carried if several else (carried,)
        state = list(parts)
        d_final = [torch.randn(x.shape, dtype=torch.float64, generator=generator) for x in parts]
        d_out = torch.randn(2, T, 2, V, dtype=torch.float64, generator=generator)
        return problem, state, d_out, d_final, several

    def run_end_state(self, problem: Problem, K: int, V: int, seed: int, **shape):
        """A realistic (e.g. SPD) state for `problem`, as naive_<name> returns it (a tensor, or a tuple of parts):
        its final state after 5 fresh tokens with the problem's per-head inputs (shape: the prefix's B and H)."""
        prefix = self.problem(5, K, V, seed=seed, **shape)
        prefix.inputs.update({n: x for n, x in problem.inputs.items() if not self.spec.input(n).per_token})
        _, carried = self.naive(*prefix.args(), output_final_state=True)
        return tuple(x.detach() for x in carried) if isinstance(carried, tuple) else carried.detach()

    def _state_gradients(self, op, problem, state, d_out, d_final, several, **options) -> tuple:
        """Autograd of <d_out, o> + <d_final, final state> through `op`, for every input and state part."""
        leaves = [x.clone().requires_grad_(True) for x in (*problem.args(), *state)]
        carried = leaves[len(leaves) - len(state):]
        initial = None if not state else tuple(carried) if several else carried[0]
        o, final = op(*leaves[:len(leaves) - len(state)], initial_state=initial, output_final_state=True, **options)
        finals = final if several else (final,)
        loss = (o * d_out).sum() + sum((f * d).sum() for f, d in zip(finals, d_final))
        return torch.autograd.grad(loss, leaves)

    @staticmethod
    def _gradient_names(problem, n_states: int) -> list[str]:
        """The names of the gradients `_state_gradients` returns, in order."""
        return ["q", "k", "v", *problem.inputs, *(f"initial_state[{i}]" for i in range(n_states))]

    def _compare_gradients(self, found, expected, problem, n_states: int) -> None:
        names = self._gradient_names(problem, n_states)
        for i, (name, g, g_ref) in enumerate(zip(names, found, expected, strict=True)):
            if i >= len(names) - n_states and g.shape[-1] == g.shape[-2] == problem.k.shape[-1]:
                # A K x K state (a covariance) is symmetric: only its gradient's symmetric part acts on it,
                # and two correct ops may split the rest differently (P k against P^T k).
                g, g_ref = symmetric_part(g), symmetric_part(g_ref)
            torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-8, msg=lambda m, name=name: f"d/d{name}: {m}")

    def derived_backward(self, T: int = 9, K: int = 5, V: int = 4) -> None:
        """The derived adjoint (naive_<name>_backward) gives autograd's gradients of naive_<name>, for every
        input and the initial state, with gradients flowing into both the outputs and the final state."""
        problem, state, d_out, d_final, several = self._with_states(T, K, V, seed=7)
        expected = self._state_gradients(self.naive, problem, state, d_out, d_final, several)
        derived = self.backward(*problem.args(), d_out, initial_state=tuple(state) if several else state[0],
                                d_final_state=tuple(d_final) if several else d_final[0])
        derived = (*derived[:-1], *(derived[-1] if several else (derived[-1],)))
        self._compare_gradients(derived, expected, problem, len(state))

    def triton_train_gradients(self, train, T: int = 100, chunk_size: int = 16, K: int = 8, V: int = 6) -> None:
        """The Triton training path (its forward and the derived backward's kernels; on the CPU under the
        interpreter) gives the gradients of naive_<name> for every input and the initial state, in float32.
        T = 100 ends on a part chunk."""
        problem, state, d_out, d_final, several = self._with_states(T, K, V, seed=21)
        expected = self._state_gradients(self.naive, problem, state, d_out, d_final, several)

        def op(*args, initial_state, output_final_state):
            return train(*args, None, initial_state, output_final_state, None, chunk_size)

        found = self._state_gradients(op, problem.to(torch.float32), [x.float() for x in state], d_out.float(),
                                      [x.float() for x in d_final], several)
        for name, g, g_ref in zip(self._gradient_names(problem, len(state)), found, expected, strict=True):
            assert_within(g, g_ref, 1e-4, f"d/d{name}")

    def triton_train_strong_gates(self, train, T: int = 100, K: int = 20, V: int = 12) -> None:
        """The Triton training path under near-total forgetting, in chunks of 64 ending on a part chunk: finite
        gradients, within float32 rounding of naive_<name>'s (relative to the largest)."""
        problem = self.strong_gate_problem(T, K, V)
        d_out = torch.randn(2, T, 2, V, dtype=torch.float64, generator=torch.Generator().manual_seed(32))
        expected = self._state_gradients(self.naive, problem, [], d_out, [], False)

        def op(*args, initial_state, output_final_state):
            return train(*args, None, initial_state, output_final_state, None, 64)

        found = self._state_gradients(op, problem.to(torch.float32), [], d_out.float(), [], False)
        for name, g, g_ref in zip(self._gradient_names(problem, 0), found, expected, strict=True):
            assert torch.isfinite(g).all(), f"d/d{name} is not finite"
            assert_within(g, g_ref, 1e-4, f"d/d{name}")

    def triton_train_packed_gradients(self, train, lengths=(1, 17, 70, 9), K: int = 8, V: int = 6) -> None:
        """The Triton training path with cu_seqlens gives the gradients of naive_<name> run on each sequence
        from its own initial state, for every input and the initial states."""
        _, packed, cu_seqlens = self.packed_problems(lengths, K, V, seed=60)
        generator = torch.Generator().manual_seed(70)
        parts = self.state_parts()  # e.g. Titans' (S, Z)
        initial = [torch.randn(len(lengths), 2, K, V, dtype=torch.float64, generator=generator) * 0.5
                   for _ in range(parts)]
        d_out = torch.randn(1, sum(lengths), 2, V, dtype=torch.float64, generator=generator)
        d_final = [torch.randn(len(lengths), 2, K, V, dtype=torch.float64, generator=generator) for _ in range(parts)]

        def gradients(args, state, run):
            leaves = [x.clone().requires_grad_(True) for x in (*args, *state)]
            states = leaves[len(args):]
            o, final = run(leaves[:len(args)], tuple(states) if parts > 1 else states[0])
            loss = (o * d_out.to(o.dtype)).sum() + sum((f * d.to(f.dtype)).sum() for f, d in zip(state_tuple(final), d_final))
            return torch.autograd.grad(loss, leaves)

        expected = gradients(packed.args(), initial,
                             lambda args, state: naive_per_sequence(self.naive, args, state, cu_seqlens))
        found = gradients(packed.to(torch.float32).args(), [x.float() for x in initial],
                          lambda args, state: train(*args, None, state, True, cu_seqlens, 32))
        for name, g, g_ref in zip(self._gradient_names(packed, parts), found, expected, strict=True):
            assert_within(g, g_ref, 1e-4, f"d/d{name}")

    def triton_ops_opcheck(self, chunk_op, backward_op, gate: str, family: str = "gated",
                           step_per_key: bool = False) -> None:
        """The Triton custom ops (forward with autograd, and backward) pass torch.library.opcheck: schema, fake
        tensors, autograd registration and dispatch, with and without an initial state and cu_seqlens."""
        problem = self.problem(20, 8, 6, B=1, seed=25).to(torch.float32)
        generator = torch.Generator().manual_seed(26)
        rows = problem.k.shape[1]  # the gate is per sub-step row where a token takes several steps
        log_decay = {"none": None, "scalar": -torch.rand(1, rows, 2, generator=generator),
                     "per_key": -torch.rand(1, rows, 2, 8, generator=generator)}[gate]
        # the delta family's step (per sub-step row; per key channel too where it preconditions the step)
        beta = torch.rand(*(problem.k.shape if step_per_key else problem.k.shape[:3]), generator=generator)
        state = torch.randn(1, 2, 8, 6, generator=generator)
        do, d_final = torch.randn(1, 20, 2, 6, generator=generator), torch.randn(1, 2, 8, 6, generator=generator)
        q, k, v = problem.q, problem.k, problem.v
        for cu_seqlens, initial in ((None, state), (torch.tensor([0, 7, 20]), None)):
            final_grad = d_final if cu_seqlens is None else torch.cat([d_final, d_final])
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
            if family == "delta":
                torch.library.opcheck(chunk_op, (*leaves, beta, log_decay, 0.5, initial, cu_seqlens, 16))
                torch.library.opcheck(backward_op, (q, k, v, beta, log_decay, 0.5, initial, do, final_grad,
                                                    cu_seqlens, 16))
                continue
            torch.library.opcheck(chunk_op, (*leaves, log_decay, 0.5, initial, cu_seqlens, 16))
            _, _, cumulated, scores = chunk_op(q, k, v, log_decay, 0.5, initial, cu_seqlens, 16)
            torch.library.opcheck(backward_op, (q, k, v, cumulated if log_decay is not None else None,
                                                scores if gate == "per_key" else None, 0.5, initial, do, final_grad,
                                                cu_seqlens, 16))

    def flash_ops_opcheck(self, flash_op, backward_op, solver_iterations: int | None = None) -> None:
        """The attention kernels' custom ops (forward with autograd, and backward) pass torch.library.opcheck:
        schema, fake tensors, autograd registration and dispatch, for a batch with grouped query heads without
        biases, and for packed sequences with both. With `solver_iterations`, the local-linear ops (which take
        the ridge and the step count too, and save the forward's means and solution)."""
        generator = torch.Generator().manual_seed(28)
        for B, cu_seqlens, biased in ((2, None, False), (1, torch.tensor([0, 5, 12]), True)):
            q = torch.randn(B, 12, 4, 8, generator=generator)
            k, v = torch.randn(B, 12, 2, 8, generator=generator), torch.randn(B, 12, 2, 6, generator=generator)
            G = torch.cumsum(-torch.rand(B, 12, 4, generator=generator), dim=1)
            bias_q, bias_k = (G, torch.randn(B, 12, 4, generator=generator)) if biased else (None, None)
            ridge = () if solver_iterations is None else (torch.rand(4, 8, generator=generator) + 0.1,)
            solver = () if solver_iterations is None else (solver_iterations,)
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
            torch.library.opcheck(flash_op, (*leaves, bias_q, bias_k, *ridge, 0.5, -0.1, cu_seqlens, *solver))
            outputs = flash_op(q, k, v, bias_q, bias_k, *ridge, 0.5, -0.1, cu_seqlens, *solver)
            saved = outputs if solver_iterations is None else outputs[1:]  # local-linear saves no output
            do = torch.randn(outputs[0].shape, generator=generator)
            torch.library.opcheck(backward_op, (q, k, v, bias_q, bias_k, *ridge, *saved, do, 0.5, -0.1, cu_seqlens,
                                                *solver))

    def flash_triton_compiles(self, kernel) -> None:
        """torch.compile(fullgraph=True) traces flash_<name>_triton, forward and backward (custom ops with fake
        implementations), and matches eager."""
        import torch._dynamo

        torch._dynamo.reset()
        problem = self.problem(40, 8, 6, B=1, seed=24).to(torch.float32)
        compiled = torch.compile(kernel, fullgraph=True, backend="aot_eager")  # raises on any graph break
        results = []
        for op in (compiled, kernel):
            leaves = [x.clone().requires_grad_(True) for x in problem.args()]
            o, _ = op(*leaves)
            results.append((o, torch.autograd.grad(o.square().sum(), leaves)))
        torch.testing.assert_close(results[0], results[1])

    def walk_ops_opcheck(self, walk_op, backward_op) -> None:
        """A momentum layer's walk ops (forward with autograd, and backward) pass torch.library.opcheck: schema,
        fake tensors, autograd registration and dispatch."""
        generator = torch.Generator().manual_seed(27)
        BH, N, C, K, V = 2, 3, 16, 8, 6
        u = torch.randn(BH, N, C, V, generator=generator)
        w = torch.randn(BH, N, C, 2 * K, generator=generator) * 0.1
        write_t = torch.randn(BH, N, 2 * K, C, generator=generator) * 0.1
        carry = torch.rand(BH, N, 4, generator=generator)
        initial = torch.randn(BH, 2 * K, V, generator=generator)
        leaves = [x.clone().requires_grad_(True) for x in (u, w, write_t, carry, initial)]
        torch.library.opcheck(walk_op, tuple(leaves))
        starts, errors, final = walk_op(u, w, write_t, carry, initial)
        torch.library.opcheck(backward_op, (w, write_t, carry, starts, errors, torch.randn_like(starts),
                                            torch.randn_like(errors), torch.randn_like(final)))

    def triton_train_compiles(self, train) -> None:
        """torch.compile(fullgraph=True) traces the Triton training path, forward and backward (the scans are
        custom ops with fake implementations), and matches eager."""
        import torch._dynamo

        torch._dynamo.reset()
        problem = self.problem(40, 8, 6, B=1, seed=23).to(torch.float32)

        def run(*args):
            return train(*args, None, None, True, None, 16)

        compiled = torch.compile(run, fullgraph=True, backend="aot_eager")  # raises on any graph break
        results = []
        for op in (compiled, run):
            leaves = [x.clone().requires_grad_(True) for x in problem.args()]
            o, state = op(*leaves)
            grads = torch.autograd.grad(o.square().sum() + sum(s.sum() for s in state_tuple(state)), leaves)
            results.append((o, state, grads))
        torch.testing.assert_close(results[0], results[1])

    def chunk_state_gradients(self, T: int = 37, K: int = 5, V: int = 4) -> None:
        """Gradients through chunk_<name> (chunks of 16) equal those through naive_<name> for every input and
        the initial state, with gradients flowing into both the outputs and the final state."""
        problem, state, d_out, d_final, several = self._with_states(T, K, V, seed=9)
        expected = self._state_gradients(self.naive, problem, state, d_out, d_final, several)
        found = self._state_gradients(self.chunk, problem, state, d_out, d_final, several, chunk_size=16)
        self._compare_gradients(found, expected, problem, len(state))

    def gradcheck(self, T: int = 4, K: int = 3, V: int = 2) -> None:
        """Finite differences agree with autograd for every input, initial state included."""
        problem = self.problem(T, K, V, B=1, H=1, seed=4)
        prefix = self.problem(3, K, V, B=1, H=1, seed=5)
        prefix.inputs.update({n: x for n, x in problem.inputs.items() if not self.spec.input(n).per_token})
        _, state = self.naive(*prefix.args(), output_final_state=True)  # a realistic (e.g. SPD) state
        states = [s.detach().clone().requires_grad_(True) for s in (state if isinstance(state, tuple) else (state,))]
        args = [x.clone().requires_grad_(True) for x in problem.args()]

        def run(*flat):
            carried = flat[len(args):]
            if self.spec.optimiser.solver == "cg":  # conjugate gradients assume the symmetric h_kk its state holds
                carried = tuple(symmetric_part(s) if s.shape[-2:] == (K, K) else s for s in carried)
            o, final = self.naive(*flat[:len(args)], initial_state=carried if len(carried) > 1 else carried[0],
                                  output_final_state=True)
            return (o, *(final if isinstance(final, tuple) else (final,)))

        assert torch.autograd.gradcheck(run, (*args, *states), eps=1e-6, atol=1e-6, rtol=1e-5)

    def low_precision(self, dtype: torch.dtype) -> None:
        """float32 and bfloat16 inputs: output in the input dtype, states in float32, error within bound.

        The reference is the float64 result on the same (rounded) inputs, so the bound measures the
        op's own arithmetic: fp32 accumulation, then rounding of the output to `dtype`.
        """
        K = 4 if self.spec.regressor.degree == 2 else 16  # degree 2: 1 + K + K(K+1)/2 features per query
        problem = self.problem(40, K, 16, seed=6).to(dtype)
        o, state = self.naive(*problem.args(), output_final_state=True)
        assert o.dtype == dtype
        for s in state if isinstance(state, tuple) else (state,):
            assert s.dtype == torch.float32
        o_ref, _ = self.naive(*problem.to(torch.float64).args())
        assert_within(o, o_ref, 2e-2 if dtype == torch.bfloat16 else 1e-4, str(dtype))

    def fast_matches_naive(self, T: int, block_size: int, K: int = 8, V: int = 6) -> None:
        """The fast op equals the oracle (and the reference) in float64, with and without a carried state."""
        problem = self.problem(T, K, V, seed=8)
        o_ref, _ = self.oracle(problem)
        o, state = self.fast(*problem.args(), output_final_state=True, block_size=block_size)
        torch.testing.assert_close(o, o_ref, **_tolerance(torch.float64))
        o_naive, state_naive = self.naive(*problem.args(), output_final_state=True)
        torch.testing.assert_close((o, state), (o_naive, state_naive), **_tolerance(torch.float64))
        if T > 1:
            half = T // 2
            first, second = (problem.tokens(0, half, 1, set(), self.spec), problem.tokens(half, T, 1, set(), self.spec))
            _, carried = self.fast(*first.args(), output_final_state=True, block_size=block_size)
            o_2, _ = self.fast(*second.args(), initial_state=carried, block_size=block_size)
            torch.testing.assert_close(o_2, o_ref[:, half:], **_tolerance(torch.float64))

    # --- chunked forms -------------------------------------------------------------------------
    def chunk_matches_oracle(self, T: int, chunk_size: int, K: int = 12, V: int = 20) -> None:
        """Outputs and final memory equal the oracle's in float64, with a carried state too."""
        problem = self.problem(T, K, V, seed=10)
        o_ref, memory_ref = self.oracle(problem)
        o, state = self.chunk(*problem.args(), output_final_state=True, chunk_size=chunk_size)
        torch.testing.assert_close(o, o_ref, **_tolerance(torch.float64))
        torch.testing.assert_close(self.memory(state, problem), memory_ref, **_tolerance(torch.float64))
        if T > 1:
            half = T // 2
            first = problem.tokens(0, half, self.steps, self.per_step, self.spec)
            second = problem.tokens(half, T, self.steps, self.per_step, self.spec)
            _, carried = self.chunk(*first.args(), output_final_state=True, chunk_size=chunk_size)
            o_2, state_2 = self.chunk(*second.args(), initial_state=carried, output_final_state=True,
                                      chunk_size=chunk_size)
            torch.testing.assert_close(o_2, o_ref[:, half:], **_tolerance(torch.float64))
            torch.testing.assert_close(self.memory(state_2, problem), memory_ref, **_tolerance(torch.float64))

    def chunk_packed_sequences(self, lengths=(1, 17, 40, 64), chunk_size: int = 16) -> None:
        """cu_seqlens: packed sequences equal running each on its own (against the oracle from zero, and
        against the reference from per-sequence initial states)."""
        problems, packed, cu_seqlens = self.packed_problems(lengths, 6, 5, seed=20)
        o, states = self.chunk(*packed.args(), output_final_state=True, cu_seqlens=cu_seqlens,
                               chunk_size=chunk_size)
        assert all(s.shape[0] == len(lengths) for s in state_tuple(states))
        o_ref = torch.cat([self.oracle(p)[0] for p in problems], dim=1)
        torch.testing.assert_close(o, o_ref, **_tolerance(torch.float64))
        # Realistic initial states (e.g. positive definite ones): the final states of other sequences.
        initial = _join([state_tuple(self.naive(*self.problem(5, 6, 5, B=1, seed=40 + i).args(),
                                            output_final_state=True)[1]) for i in range(len(lengths))])
        o, states = self.chunk(*packed.args(), initial_state=initial, output_final_state=True,
                               cu_seqlens=cu_seqlens, chunk_size=chunk_size)
        runs = [self.naive(*p.args(), initial_state=_row(initial, i), output_final_state=True)
                for i, p in enumerate(problems)]
        torch.testing.assert_close(o, torch.cat([r[0] for r in runs], dim=1), **_tolerance(torch.float64))
        torch.testing.assert_close(state_tuple(states), state_tuple(_join([state_tuple(r[1]) for r in runs])),
                                   **_tolerance(torch.float64))

    def packed_problems(self, lengths, K: int, V: int, H: int = 2,
                        seed: int = 0) -> tuple[list[Problem], Problem, torch.Tensor]:
        """One problem per sequence length (B = 1, seeds seed, seed + 1, ...), all with the first one's per-head
        inputs (packed sequences share them), and their packing along T with its cu_seqlens."""
        problems = share_per_head_inputs([self.problem(n, K, V, B=1, H=H, seed=seed + i)
                                          for i, n in enumerate(lengths)], self.spec)
        packed, cu_seqlens = pack(problems, self.spec)
        return problems, packed, cu_seqlens

    def strong_gate_problem(self, T: int, K: int, V: int) -> Problem:
        """A problem whose gates forget almost everything per token (see _STRONG_GATE)."""
        problem = self.problem(T, K, V, seed=30)
        generator = torch.Generator().manual_seed(31)
        for name, x in problem.inputs.items():
            role = self.spec.input(name).role
            if role in _STRONG_GATE:
                problem.inputs[name] = _STRONG_GATE[role](
                    torch.randn(x.shape, generator=generator, dtype=torch.float64), generator)
        assert set(self.spec.input(n).role for n in problem.inputs) & set(_STRONG_GATE), "no gate to strengthen"
        return problem

    def chunk_strong_gates(self, T: int = 150, K: int = 8, V: int = 6) -> None:
        """Gates that forget almost everything per token: the chunked form equals the oracle in float64 and
        stays finite and within float32 rounding of it in float32 (no overflow in its gate factors)."""
        problem = self.strong_gate_problem(T, K, V)
        o_ref, memory_ref = self.oracle(problem)
        for chunk_size in (16, 64):
            o, state = self.chunk(*problem.args(), output_final_state=True, chunk_size=chunk_size)
            torch.testing.assert_close(o, o_ref, **_tolerance(torch.float64))
            torch.testing.assert_close(self.memory(state, problem), memory_ref, **_tolerance(torch.float64))
            o_32, _ = self.chunk(*problem.to(torch.float32).args(), chunk_size=chunk_size)
            assert torch.isfinite(o_32).all()
            assert_within(o_32, o_ref, 1e-4, f"float32, chunk {chunk_size}")

    def chunk_gradients_match_oracle(self, T: int = 21, K: int = 4, V: int = 3) -> None:
        problem = self.problem(T, K, V, B=1, seed=11)
        weights = torch.randn(1, T, 2, V, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
        leaves = [x.clone().requires_grad_(True) for x in problem.args()]
        o, _ = self.chunk(*leaves, chunk_size=16)
        grads = torch.autograd.grad((o * weights).sum(), leaves)
        leaves_ref = [x.clone().requires_grad_(True) for x in problem.args()]
        o_ref, _ = oracle.solve(self.spec, *leaves_ref[:3], dict(zip(problem.inputs, leaves_ref[3:])))
        grads_ref = torch.autograd.grad((o_ref * weights).sum(), leaves_ref)
        for name, g, g_ref in zip(["q", "k", "v", *problem.inputs], grads, grads_ref):
            torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=1e-7, msg=lambda m, name=name: f"d/d{name}: {m}")

    def triton_steps_match_oracle(self, chunk_module, T: int = 45, K: int = 12, V: int = 10,
                                  chunk_size: int = 16) -> None:
        """The chunked form with its conjugate-gradient solve in Triton (`cg_triton`, which it uses on a GPU; here
        forced, under the interpreter on a CPU), in float32 against the oracle in float64: the output and the
        gradient of every input (the forward's and the backward's kernels), then the same split into two calls,
        the second from the first's final state (whose gradient carries the first half's), then float16 inputs."""
        problem = self.problem(T, K, V, B=1, seed=21)
        leaves_ref = [x.clone().requires_grad_(True) for x in problem.args()]
        o_ref, _ = oracle.solve(self.spec, *leaves_ref[:3], dict(zip(problem.inputs, leaves_ref[3:])))
        weights = torch.randn(o_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(22))
        half = T // 2
        grads_ref = torch.autograd.grad((o_ref * weights).sum(), leaves_ref, retain_graph=True)
        grads_ref_later = torch.autograd.grad((o_ref[:, half:] * weights[:, half:]).sum(), leaves_ref)
        o_ref = o_ref.detach()
        original = chunk_module._steps_in_triton
        chunk_module._steps_in_triton = lambda *args: True
        try:
            leaves = [x.clone().requires_grad_(True) for x in problem.to(torch.float32).args()]
            o, _ = self.chunk(*leaves, chunk_size=chunk_size)
            assert_within(o, o_ref, 1e-4, "float32 steps in Triton")
            grads = torch.autograd.grad((o * weights.float()).sum(), leaves)

            split = Problem(*leaves[:3], dict(zip(problem.inputs, leaves[3:])))
            first = split.tokens(0, half, self.steps, self.per_step, self.spec)
            second = split.tokens(half, T, self.steps, self.per_step, self.spec)
            _, carried = self.chunk(*first.args(), output_final_state=True, chunk_size=chunk_size)
            o_later, _ = self.chunk(*second.args(), initial_state=carried, chunk_size=chunk_size)
            assert_within(o_later, o_ref[:, half:], 1e-4, "float32 steps in Triton, carried state")
            grads_later = torch.autograd.grad((o_later * weights[:, half:].float()).sum(), leaves)

            # 16-bit inputs take 16-bit operands (cg_triton.precision); float16 here: the interpreter's bfloat16
            # products are wrong on some CPUs (the GPU test module runs bfloat16).
            low = problem.to(torch.float16)
            low_leaves = [x.clone().requires_grad_(True) for x in low.args()]
            o_low, _ = self.chunk(*low_leaves, chunk_size=chunk_size)
            grads_low = torch.autograd.grad((o_low.double() * weights).sum(), low_leaves)
            low_ref = [x.clone().requires_grad_(True) for x in low.to(torch.float64).args()]
            o_low_ref, _ = self.naive(*low_ref)
            grads_low_ref = torch.autograd.grad((o_low_ref * weights).sum(), low_ref)
            assert o_low.dtype == torch.float16
            assert_within(o_low, o_low_ref, 1e-2, "float16 inputs, steps in Triton")
        finally:
            chunk_module._steps_in_triton = original
        for name, g, g_ref, g_later, g_later_ref in zip(["q", "k", "v", *problem.inputs], grads, grads_ref,
                                                        grads_later, grads_ref_later, strict=True):
            assert_within(g, g_ref, 1e-3, f"d/d{name}, float32 steps in Triton")
            assert_within(g_later, g_later_ref, 1e-3, f"d/d{name} through the carried state, steps in Triton")
        for name, g, g_ref in zip(["q", "k", "v", *problem.inputs], grads_low, grads_low_ref, strict=True):
            assert_within(g, g_ref, 1e-2, f"d/d{name}, float16 inputs, steps in Triton")

    def rls_triton_matches_oracle(self, chunk_module, T: int = 45, K: int = 6, V: int = 5) -> None:
        """Recursive least squares in Triton (`rls_triton`; chunk_<name> takes it on a GPU; here forced, under the
        interpreter on a CPU, with a checkpoint every two chunks, so that the backward walks several spans of
        several chunks, the last one short), float32 against the float64 reference: the output and the final
        state, and the gradient of every input and of the initial state with gradients flowing into both the
        output and the final state; packed sequences from per-sequence initial states, outputs, final states and
        gradients; float16 inputs; for chunks, sixteen of them under strong forgetting, with every gradient; the
        kernels' op with sample weights. Every setting of RLS_KERNEL_SETTINGS."""
        kernels = importlib.import_module(chunk_module.__name__.rsplit(".", 1)[0] + ".rls_triton")
        settings = ("CHECKPOINT", "FORWARD", "BACKWARD", "GAINS", "CHUNK", "PRODUCTS", "LOOPS")
        original, in_triton = {name: getattr(kernels, name) for name in settings}, chunk_module._rls_in_triton
        chunk_module._rls_in_triton, kernels.CHECKPOINT = (lambda *args: True), 2 * kernels.CHUNK
        try:
            for setting in RLS_KERNEL_SETTINGS:
                vars(kernels).update(rls_kernel_settings(setting))
                self._rls_triton_checks(T, K, V, setting, forgetting=kernels.FORWARD == "chunks")
                self._rls_kernel_sample_weights(kernels, setting)
        finally:
            vars(kernels).update(original)
            chunk_module._rls_in_triton = in_triton

    def _rls_triton_checks(self, T: int, K: int, V: int, algorithm: str, forgetting: bool) -> None:
        problem, state, d_out, d_final, several = self._with_states(T, K, V, seed=42)
        o_ref, final_ref = self.naive(*problem.args(), initial_state=tuple(state), output_final_state=True)
        o, final = self.chunk(*problem.to(torch.float32).args(), initial_state=tuple(x.float() for x in state),
                              output_final_state=True)
        assert o.dtype == torch.float32 and all(x.dtype == torch.float32 for x in final)
        assert_within(o, o_ref, 1e-4, f"output, Triton {algorithm}")
        for i, (x, x_ref) in enumerate(zip(final, final_ref, strict=True)):
            assert_within(x, x_ref, 1e-4, f"final state[{i}], Triton {algorithm}")
        expected = self._state_gradients(self.naive, problem, state, d_out, d_final, several)
        found = self._state_gradients(self.chunk, problem.to(torch.float32), [x.float() for x in state],
                                      d_out.float(), [x.float() for x in d_final], several)
        self._assert_gradients_within(found, expected, problem, len(state), 1e-4, f"Triton {algorithm}")

        lengths = (1, 17, 40, 9)
        problems, packed, cu_seqlens = self.packed_problems(lengths, K, V, seed=43)
        initial = _join([state_tuple(self.naive(*self.problem(5, K, V, B=1, seed=44 + i).args(),
                                                output_final_state=True)[1]) for i in range(len(lengths))])
        generator = torch.Generator().manual_seed(48)
        d_out = torch.randn(1, sum(lengths), 2, V, dtype=torch.float64, generator=generator)
        d_final = [torch.randn(x.shape, dtype=torch.float64, generator=generator) for x in initial]

        def packed_run(leaves, states):
            return self.chunk(*leaves, initial_state=tuple(states), output_final_state=True,
                              cu_seqlens=cu_seqlens)

        def one_by_one(leaves, states):  # the reference: each sequence from its own initial state
            bounds = cu_seqlens.tolist()
            runs = []
            for i in range(len(problems)):
                rows = slice(bounds[i], bounds[i + 1])
                args = [x[:, rows] if x.dim() >= 3 and x.shape[1] == bounds[-1] else x for x in leaves]
                runs.append(self.naive(*args, initial_state=tuple(s[i:i + 1] for s in states),
                                       output_final_state=True))
            return torch.cat([r[0] for r in runs], dim=1), _join([state_tuple(r[1]) for r in runs])

        results = []
        for run, dtype in ((packed_run, torch.float32), (one_by_one, torch.float64)):
            leaves = [x.to(dtype).requires_grad_(True) for x in (*packed.args(), *initial)]
            args, states = leaves[:len(leaves) - len(initial)], leaves[len(leaves) - len(initial):]
            o, final = run(args, states)
            loss = (o * d_out.to(dtype)).sum() + sum((f * d.to(dtype)).sum() for f, d in zip(final, d_final))
            results.append((o, final, torch.autograd.grad(loss, leaves)))
        (o, final, grads), (o_ref, final_ref, grads_ref) = results
        assert_within(o, o_ref, 1e-4, f"packed sequences' output, Triton {algorithm}")
        for i, (x, x_ref) in enumerate(zip(final, final_ref, strict=True)):
            assert_within(x, x_ref, 1e-4, f"packed sequences' final state[{i}], Triton {algorithm}")
        self._assert_gradients_within(grads, grads_ref, packed, len(initial), 1e-4,
                                      f"packed sequences, Triton {algorithm}")

        low = problem.to(torch.float16)
        o_low, _ = self.chunk(*low.args())
        o_low_ref, _ = self.naive(*low.to(torch.float64).args())
        assert o_low.dtype == torch.float16
        assert_within(o_low, o_low_ref, 1e-2, f"float16 inputs, Triton {algorithm}")

        if not forgetting:
            return
        # 256 tokens (sixteen chunks) under strong forgetting (log-decays down to -0.2 a token), where P spans
        # orders of magnitude: without symmetrising P at every chunk's end the chunk forward's rounding grows past
        # any bound (1e9 of the output's largest value here); the backward walks the sixteen chunks back.
        long = self.problem(256, 16, 16, B=1, H=1, seed=49)
        for name in long.inputs:
            if self.spec.input(name).role == "log_decay":
                long.inputs[name] = -0.2 * torch.rand(long.inputs[name].shape, dtype=torch.float64,
                                                      generator=torch.Generator().manual_seed(50))
        o_ref, final_ref = self.naive(*long.args(), output_final_state=True)
        o, final = self.chunk(*long.to(torch.float32).args(), output_final_state=True)
        assert_within(o, o_ref, 1e-3, f"output after 256 tokens of strong forgetting, Triton {algorithm}")
        for i, (x, x_ref) in enumerate(zip(final, final_ref, strict=True)):
            assert_within(x, x_ref, 1e-3, f"final state[{i}] after 256 tokens of strong forgetting, Triton {algorithm}")
        state = [x.to(torch.float32) for x in self.naive(*self.problem(8, 16, 16, B=1, H=1, seed=51).args(),
                                                          output_final_state=True)[1]]
        generator = torch.Generator().manual_seed(52)
        d_out = torch.randn(o_ref.shape, dtype=torch.float64, generator=generator)
        d_final = [torch.randn(x.shape, dtype=torch.float64, generator=generator) for x in state]
        expected = self._state_gradients(self.naive, long, [x.double() for x in state], d_out, d_final, True)
        found = self._state_gradients(self.chunk, long.to(torch.float32), state, d_out.float(),
                                      [x.float() for x in d_final], True)
        self._assert_gradients_within(found, expected, long, len(state), 1e-3,
                                      f"256 tokens of strong forgetting, Triton {algorithm}")

    @staticmethod
    def _rls_kernel_sample_weights(kernels, algorithm: str, T: int = 40, K: int = 4, V: int = 3) -> None:
        """The kernels' own op (`rls_triton.recursive_least_squares`) with per-token sample weights, which no layer
        passes yet (its layers weigh every token 1): output, final state and every gradient, sample weights'
        included, against the weighted ridge regression solved exactly token by token (`_weighted_ridge`)."""
        generator = torch.Generator().manual_seed(53)
        q, k = (torch.randn(1, T, 2, K, dtype=torch.float64, generator=generator) for _ in range(2))
        k = F.normalize(k, dim=-1)
        v = torch.randn(1, T, 2, V, dtype=torch.float64, generator=generator)
        g = -0.1 * torch.rand(1, T, 2, dtype=torch.float64, generator=generator)
        w = 0.2 + torch.rand(1, T, 2, dtype=torch.float64, generator=generator)
        S = torch.randn(1, 2, K, V, dtype=torch.float64, generator=generator)
        X = torch.randn(1, 2, K, K, dtype=torch.float64, generator=generator)
        P = torch.linalg.inv(X @ X.transpose(-1, -2) / K + torch.eye(K, dtype=torch.float64))
        d_o, d_S, d_P = (torch.randn(x.shape, dtype=torch.float64, generator=generator)
                         for x in (v, S, P))
        results = []
        for run, dtype in ((kernels.recursive_least_squares, torch.float32), (_weighted_ridge, torch.float64)):
            leaves = [x.to(dtype).requires_grad_(True) for x in (q, k, v, g, w, S, P)]
            o, S_final, P_final = run(*leaves, 0.5)
            loss = (o * d_o.to(dtype)).sum() + (S_final * d_S.to(dtype)).sum() + (P_final * d_P.to(dtype)).sum()
            results.append((o, S_final, P_final, torch.autograd.grad(loss, leaves)))
        (*found, grads), (*expected, grads_ref) = results
        for name, x, x_ref in zip(("output", "final S", "final P"), found, expected, strict=True):
            assert_within(x, x_ref, 1e-4, f"{name} with sample weights, Triton {algorithm}")
        for name, x, x_ref in zip(("q", "k", "v", "g", "w", "S", "P"), grads, grads_ref, strict=True):
            if name == "P":  # only the symmetric part acts on a covariance (see _compare_gradients)
                x, x_ref = symmetric_part(x), symmetric_part(x_ref)
            assert_within(x, x_ref, 1e-4, f"d/d{name} with sample weights, Triton {algorithm}")

    def _assert_gradients_within(self, found, expected, problem, n_states: int, relative: float, what: str) -> None:
        """`_compare_gradients` at a tolerance relative to each gradient's largest entry (float32 ops)."""
        names = self._gradient_names(problem, n_states)
        for i, (name, g, g_ref) in enumerate(zip(names, found, expected, strict=True)):
            if i >= len(names) - n_states and g.shape[-1] == g.shape[-2] == problem.k.shape[-1]:
                g, g_ref = symmetric_part(g), symmetric_part(g_ref)  # see there
            assert_within(g, g_ref, relative, f"d/d{name}, {what}")

    def rls_triton_compiles(self, chunk_module) -> None:
        """With the token loop in Triton (forced, as in `rls_triton_matches_oracle`): its custom ops pass
        torch.library.opcheck (schema, fake tensors, autograd registration, dispatch), with and without the
        training checkpoints and packed sequences, and torch.compile(fullgraph=True) traces chunk_<name> around
        them, forward and backward, as eager runs it."""
        import torch._dynamo

        kernels = importlib.import_module(chunk_module.__name__.rsplit(".", 1)[0] + ".rls_triton")
        original, span = chunk_module._rls_in_triton, kernels.CHECKPOINT
        chunk_module._rls_in_triton, kernels.CHECKPOINT = (lambda *args: True), kernels.CHUNK
        try:
            generator = torch.Generator().manual_seed(49)
            B, T, H, K, V = 2, 20, 2, 4, 3
            q, k = torch.randn(B, T, H, K, generator=generator), F.normalize(torch.randn(B, T, H, K, generator=generator), dim=-1)
            v = torch.randn(B, T, H, V, generator=generator)
            g, w = -0.1 * torch.rand(B, T, H, generator=generator), torch.rand(B, T, H, generator=generator)
            S, P = torch.randn(B, H, K, V, generator=generator), torch.eye(K).expand(B, H, K, K).contiguous()
            packed = [x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g, w)]
            cu_seqlens = torch.tensor([0, 7, B * T])
            for args in ((q, k, v, g, w, S, P, 0.5, None), (*packed, S, P, 0.5, cu_seqlens)):
                for save in (False, True):
                    torch.library.opcheck(kernels.rls_op, (*args, save))
                o, S_final, P_final, S_saved, P_saved = kernels.rls_op(*args, True)
                d = [torch.randn(x.shape, generator=generator) for x in (o, S_final, P_final)]
                torch.library.opcheck(kernels.rls_backward_op, (*d, *args[:5], S_saved, P_saved, 0.5, args[-1]))

            torch._dynamo.reset()
            problem = self.problem(40, 8, 6, B=1, seed=50).to(torch.float32)
            compiled = torch.compile(self.chunk, fullgraph=True, backend="aot_eager")  # raises on any graph break
            results = []
            for op in (compiled, self.chunk):
                leaves = [x.clone().requires_grad_(True) for x in problem.args()]
                o, state = op(*leaves, output_final_state=True)
                grads = torch.autograd.grad(o.square().sum() + sum(s.sum() for s in state_tuple(state)), leaves)
                results.append((o, state, grads))
            torch.testing.assert_close(results[0], results[1])
        finally:
            chunk_module._rls_in_triton, kernels.CHECKPOINT = original, span

    def triton_solve_compiles(self, chunk_module) -> None:
        """With the solve in Triton (forced, as in `triton_steps_match_oracle`): its custom ops pass
        torch.library.opcheck (schema, fake tensors, autograd registration, dispatch), and
        torch.compile(fullgraph=True) traces the chunked form around them, forward and backward, as eager runs it."""
        import torch._dynamo

        from_chunk = importlib.import_module(chunk_module.__name__.rsplit(".", 1)[0] + ".cg_triton")
        problem = self.problem(40, 8, 6, B=1, seed=24).to(torch.float32)
        calls = {}
        original = chunk_module._steps_in_triton
        entries = {name: getattr(from_chunk, name) for name in ("linear_memory_layer", "affine_memory_layer")
                   if hasattr(from_chunk, name)}
        chunk_module._steps_in_triton = lambda *args: True

        def recorded(name):  # an entry point that notes its arguments
            return lambda *args, **kwargs: calls.setdefault(name, (args, kwargs)) and entries[name](*args, **kwargs)
        for name in entries:
            setattr(from_chunk, name, recorded(name))
        try:
            self.chunk(*problem.args(), chunk_size=16)
            assert calls, "the chunked form called none of cg_triton's entry points"
            for name, function in entries.items():
                setattr(from_chunk, name, function)
            (name, (args, kwargs)), = calls.items()
            precision = self._triton_layer_ops_pass(from_chunk, args, kwargs, centred=name == "affine_memory_layer")
            self._triton_moments_match(from_chunk, precision)

            torch._dynamo.reset()
            compiled = torch.compile(self.chunk, fullgraph=True, backend="aot_eager")  # raises on any graph break
            results = []
            for op in (compiled, self.chunk):
                leaves = [x.clone().requires_grad_(True) for x in problem.args()]
                o, state = op(*leaves, output_final_state=True, chunk_size=16)
                grads = torch.autograd.grad(o.square().sum() + sum(s.sum() for s in state_tuple(state)), leaves)
                results.append((o, state, grads))
            torch.testing.assert_close(results[0], results[1])
        finally:
            chunk_module._steps_in_triton = original
            for name, function in entries.items():
                setattr(from_chunk, name, function)

    @staticmethod
    def _triton_layer_ops_pass(from_chunk, args, kwargs, centred: bool) -> str:
        """opcheck of the memory's layer op and its backward op, at the arguments the chunked form gave
        `linear_memory_layer` (or, centred, `affine_memory_layer`), from a zero state and from a given one; the
        products' precision it asked for."""
        if centred:
            q, k, v, g, weight, ridge, _, iterations, chunk_size, precision = args
        else:
            q, k, v, g, weight, ridge, _, _, iterations, chunk_size, precision = args
        tensors = [t.detach() for t in (q, k, v, g, weight, ridge)]
        B, T, H, K = k.shape
        V = v.shape[-1]
        gen = torch.Generator().manual_seed(27)
        # h_kk, h_kv, then an affine memory's weight total, key sum and value sum
        shapes = [(B, H, K, K), (B, H, K, V)] + ([(B, H), (B, H, K), (B, H, V)] if centred else [])
        given = [torch.rand(shape, generator=gen) + 0.5 for shape in shapes]  # a positive weight total
        settings = (kwargs.get("scale", 1.0), iterations, chunk_size, precision)
        for initial in ([None] * 5, given + [None] * (5 - len(given))):
            op_args = (*tensors, *initial, centred, *settings)
            torch.library.opcheck(from_chunk.layer_op, op_args)
        # The backward op takes the same arguments from either start (the initial state is not one of them).
        outputs = from_chunk.layer_op(*op_args)
        finals = outputs[1:6] if centred else outputs[1:3]
        d_finals = [torch.randn(t.shape, generator=gen) for t in finals]
        d_out = torch.randn(outputs[0].shape, generator=gen)
        x, kk_start, kv_start, totals, *sums = outputs[6:]
        torch.library.opcheck(from_chunk.layer_backward_op,
                              (d_out, d_finals, x, *tensors[1:], kk_start, kv_start, totals, sums, *settings, q.dtype))
        return precision

    @staticmethod
    def _triton_moments_match(from_chunk, precision: str) -> None:
        """The chunk-start moments' op (`cg_triton.moments_op`) and its backward op pass opcheck, and equal the
        token loop S_t = exp(g_t) S_(t-1) + w_t k_t values_t^T in float64 (every chunk start and the final S, and
        the gradients of k, values, g, w and the initial S), with and without an initial S, for 19 chunks (the
        walk over them takes 16 at a time: a second group cut short), the last chunk cut short, and 80 columns
        (blocks of 64 columns and of 256 of the moment's elements, the last part masked)."""
        gen = torch.Generator().manual_seed(26)
        B, T, H, K, W, C = 2, 300, 2, 8, 80, 16
        keys, values = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, W, generator=gen)
        g, w = -0.1 * torch.rand(B, T, H, generator=gen), torch.rand(B, T, H, generator=gen)
        for initial in (None, torch.randn(B, H, K, W, generator=gen)):
            args = (keys, values, g, w, initial, C, precision)
            short = (*(x[:, :40] for x in args[:4]), *args[4:])  # opcheck runs it many times: 3 chunks
            torch.library.opcheck(from_chunk.moments_op, short)
            if initial is None:  # the backward op's arguments do not include the initial moment: one check
                starts, final, totals = from_chunk.moments_op(*short)
                d_starts, d_final = torch.randn(starts.shape, generator=gen), torch.randn(final.shape, generator=gen)
                torch.library.opcheck(from_chunk.moments_backward_op,
                                      (d_starts, d_final, *short[:4], starts, totals, C, precision))
            d_starts = torch.randn(B, H, -(-T // C), K, W, generator=gen)  # a start per chunk
            results = []
            for dtype in (torch.float32, torch.float64):
                leaves = [x.to(dtype, copy=True).requires_grad_(True) for x in (keys, values, g, w)]
                start = [] if initial is None else [initial.to(dtype, copy=True).requires_grad_(True)]
                if dtype == torch.float32:
                    out = from_chunk.chunk_moments(*leaves, *(start or [None]), C, precision)
                else:  # the token loop
                    state = start[0] if start else torch.zeros(B, H, K, W, dtype=dtype)
                    kept = []
                    for t in range(T):
                        if t % C == 0:
                            kept.append(state)
                        k_t, v_t, g_t, w_t = (x[:, t] for x in leaves)
                        write = (w_t[..., None] * k_t)[..., None] * v_t[..., None, :]
                        state = g_t.exp()[..., None, None] * state + write
                    out = torch.stack(kept, dim=2), state
                loss = (out[0] * d_starts.to(dtype)).sum() + (out[1] * d_final.to(dtype)).sum()
                results.append([x.double() for x in (*out, *torch.autograd.grad(loss, leaves + start))])
            for name, got, want in zip(["starts", "final", "dk", "dvalues", "dg", "dw", "dinitial"], *results):
                assert_within(got, want, 1e-4, f"chunk moments: {name}")

    def chunk_low_precision(self) -> None:
        """bfloat16 inputs: output in bfloat16, state in float32, within 2% of the float64 result."""
        problem = self.problem(200, 32, 32, seed=13).to(torch.bfloat16)
        o, state = self.chunk(*problem.args(), output_final_state=True)
        assert o.dtype == torch.bfloat16 and all(s.dtype == torch.float32 for s in state_tuple(state))
        o_ref, _ = self.naive(*problem.to(torch.float64).args())
        assert_within(o, o_ref, 2e-2, "bfloat16")

    def chunk_compiles(self) -> None:
        """torch.compile(fullgraph=True) traces the chunked path, forward and backward, with no graph break."""
        import torch._dynamo

        torch._dynamo.reset()
        problem = self.problem(40, 8, 6, B=1, seed=14).to(torch.float32)
        compiled = torch.compile(self.chunk, fullgraph=True, backend="aot_eager")
        leaves = [x.clone().requires_grad_(True) for x in problem.args()]
        o, state = compiled(*leaves, output_final_state=True, chunk_size=16)
        o.square().sum().backward()
        o_eager, state_eager = self.chunk(*problem.args(), output_final_state=True, chunk_size=16)
        torch.testing.assert_close((o, state), (o_eager, state_eager))
        assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)

    # --- Triton kernels ------------------------------------------------------------------------
    def fused_recurrent_matches_oracle(self, T: int, K: int, V: int, device: str = "cpu",
                                       dtype: torch.dtype = torch.float32) -> None:
        """The decoding kernel equals the float64 oracle (see `_kernel_matches_oracle`)."""
        self._kernel_matches_oracle(self.fused_recurrent, T, K, V, seed=15, device=device, dtype=dtype)

    def flash_triton_matches_oracle(self, kernel, T: int = 37, K: int = 16, V: int = 12, group: int = 2,
                                    device: str = "cpu", dtype: torch.dtype = torch.float32,
                                    gradients: bool = True) -> None:
        """The attention Triton kernels (flash_<name>_triton) against the float64 oracle: the output and, with
        `gradients` (kernels with a backward), the gradient of every input, with `group` query heads per key
        head (the oracle sees each key head repeated), for a batch and for packed sequences (batch row 0,
        then the second half of row 1), and the forward from a cache of earlier tokens."""
        problem = self._grouped_problem(T, K, V, group, seed=41)
        bound = 1e-4 if dtype == torch.float32 else 2e-2
        self._flash_matches_oracle(kernel, problem, group, None, device, dtype, bound, gradients)
        if T > 1:
            half = T // 2
            second = problem.tokens(half, T, 1, set(), self.spec)
            packed, cu_seqlens = pack([problem.row(0, self.spec), second.row(1, self.spec)], self.spec)
            self._flash_matches_oracle(kernel, packed, group, cu_seqlens.to(device), device, dtype, bound, gradients)
            first = problem.tokens(0, half, 1, set(), self.spec).to(dtype, device)
            with torch.no_grad():
                _, cache = kernel(*first.args(), output_final_state=True)
                o, cache = kernel(*second.to(dtype, device).args(), initial_state=cache, output_final_state=True)
            assert_within(o.cpu(), self._grouped_oracle(problem, group, None)[:, half:], bound, "o after a cache")
            for name, part, full in zip(*self._cache_parts(problem.to(dtype, device)), cache, strict=True):
                torch.testing.assert_close(part, full, msg=lambda m, name=name: f"the cache's {name}: {m}")

    def flash_triton_decodes(self, kernel, N: int = 150, K: int = 16, V: int = 12, group: int = 2,
                             device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        """Decoding (one query against a cache of N - 1 earlier tokens, no autograd: the split-key kernel) gives
        the oracle's output for the last token, and the cache grows by that token."""
        problem = self._grouped_problem(N, K, V, group, seed=43)
        o_ref = self._grouped_oracle(problem, group, None)[:, -1:]
        run = problem.to(dtype, device)
        names, parts = self._cache_parts(run)
        cache = tuple(x[:, :N - 1] for x in parts)
        with torch.no_grad():
            o, grown = kernel(*run.tokens(N - 1, N, 1, set(), self.spec).args(), initial_state=cache,
                              output_final_state=True)
        assert o.dtype == dtype and o.shape == o_ref.shape
        assert_within(o.cpu(), o_ref, 1e-4 if dtype == torch.float32 else 2e-2, "o")
        for name, part, full in zip(names, parts, grown, strict=True):
            torch.testing.assert_close(part, full, msg=lambda m, name=name: f"the cache's {name}: {m}")

    def _cache_parts(self, problem: Problem) -> tuple[tuple[str, ...], tuple[torch.Tensor, ...]]:
        """An attention layer's cache as its ops keep it, names and tensors: k, v, then the decay's and the sample
        weights' inputs (whatever order the spec declares them in)."""
        names = ("k", "v") + tuple(n for n in (self.spec.weights.decay, self.spec.weights.sample_weight) if n)
        return names, (problem.k, problem.v, *(problem.inputs[n] for n in names[2:]))

    def refuses_autograd(self, kernel) -> None:
        """A forward-only kernel raises (NotImplementedError, naming itself) when autograd would need its
        backward, rather than returning an output without gradients."""
        problem = self.problem(5, 4, 3, B=1, seed=44).to(torch.float32)
        leaves = [x.requires_grad_(True) for x in problem.args()]
        try:
            kernel(*leaves)
        except NotImplementedError as error:
            assert "backward" in str(error)
        else:
            raise AssertionError("the forward-only kernel accepted inputs that require gradients")

    def _grouped_problem(self, T: int, K: int, V: int, group: int, seed: int) -> Problem:
        """A problem with two key and value heads and `group` query heads for each (grouped-query attention)."""
        problem = self.problem(T, K, V, H=2 * group, seed=seed)
        return Problem(problem.q, problem.k[:, :, ::group], problem.v[:, :, ::group], problem.inputs)

    def _grouped_oracle(self, problem: Problem, group: int, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """The oracle's output with every key and value head repeated for its `group` query heads, sequence by
        sequence where cu_seqlens packs several."""
        bounds = [0, problem.q.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
        outputs = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            part = Problem(problem.q[:, start:stop], problem.k[:, start:stop].repeat_interleave(group, 2),
                           problem.v[:, start:stop].repeat_interleave(group, 2),
                           {n: x[:, start:stop] for n, x in problem.inputs.items()})
            outputs.append(self.oracle(part)[0])
        return torch.cat(outputs, dim=1)

    def _flash_matches_oracle(self, kernel, problem: Problem, group: int, cu_seqlens, device: str,
                              dtype: torch.dtype, bound: float, gradients: bool) -> None:
        generator = torch.Generator().manual_seed(42)
        d_out = torch.randn(*problem.q.shape[:3], problem.v.shape[-1], dtype=torch.float64, generator=generator)
        names = ["q", "k", "v", *problem.inputs]

        def differentiate(run, dtype, device):
            leaves = [x.to(device, dtype).requires_grad_(True) for x in problem.args()]
            o = run(Problem(*leaves[:3], dict(zip(problem.inputs, leaves[3:]))))
            return o, torch.autograd.grad((o * d_out.to(device, o.dtype)).sum(), leaves)

        if not gradients:  # a forward-only kernel
            with torch.no_grad():
                o = kernel(*problem.to(dtype, device).args(), cu_seqlens=cu_seqlens)[0]
            o_ref = self._grouped_oracle(problem, group, cu_seqlens)
            assert o.dtype == dtype and o.shape == o_ref.shape
            assert_within(o.cpu(), o_ref, bound, "o")
            return
        o_ref, expected = differentiate(lambda p: self._grouped_oracle(p, group, cu_seqlens), torch.float64, "cpu")
        o, found = differentiate(lambda p: kernel(*p.args(), cu_seqlens=cu_seqlens)[0], dtype, device)
        assert o.dtype == dtype and o.shape == o_ref.shape
        assert_within(o.cpu(), o_ref, bound, "o")
        for name, g, g_ref in zip(names, found, expected, strict=True):
            assert g.dtype == dtype, f"d/d{name} is {g.dtype}"
            assert_within(g.cpu(), g_ref, bound, f"d/d{name}")

    def triton_chunk_matches_oracle(self, kernel, T: int, chunk_size: int, K: int = 20, V: int = 12,
                                    device: str = "cpu") -> None:
        """The chunked Triton forward equals the float64 oracle (see `_kernel_matches_oracle`)."""
        self._kernel_matches_oracle(kernel, T, K, V, seed=17, device=device, dtype=torch.float32,
                                    chunk_size=chunk_size)

    def triton_chunk_strong_gates(self, kernel, T: int = 100, K: int = 20, V: int = 12,
                                  device: str = "cpu") -> None:
        """The chunked Triton forward under near-total forgetting: finite, within float32 rounding of the oracle."""
        problem = self.strong_gate_problem(T, K, V)
        o_ref, _ = self.oracle(problem)
        o, _ = kernel(*problem.to(torch.float32, device).args(), chunk_size=64)
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o.double().cpu(), o_ref, **_tolerance(torch.float32))

    def _kernel_matches_oracle(self, kernel, T: int, K: int, V: int, seed: int, device: str,
                               dtype: torch.dtype, **options) -> None:
        """A Triton kernel against the float64 oracle: outputs and final memory, a state carried from a
        prefix, and packed sequences (all of batch row 0, then the second half of row 1)."""
        problem = self.problem(T, K, V, seed=seed)
        o_ref, memory_ref = self.oracle(problem)
        run = problem.to(dtype, device)
        bound = {"atol": 2e-4, "rtol": 2e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
        o, state = kernel(*run.args(), output_final_state=True, **options)
        assert o.dtype == dtype and all(s.dtype == torch.float32 for s in state_tuple(state))
        torch.testing.assert_close(o.double().cpu(), o_ref, **bound)
        memory = tuple(s.double().cpu() for s in state) if isinstance(state, tuple) else state.double().cpu()
        torch.testing.assert_close(self.memory(memory, problem), memory_ref, **bound)
        if T > 1:
            half = T // 2
            first = run.tokens(0, half, self.steps, self.per_step, self.spec)
            second = run.tokens(half, T, self.steps, self.per_step, self.spec)
            _, carried = kernel(*first.args(), output_final_state=True, **options)
            o_2, _ = kernel(*second.args(), initial_state=carried, **options)
            torch.testing.assert_close(o_2.double().cpu(), o_ref[:, half:], **bound)
            packed, cu_seqlens = pack([run.row(0, self.spec), second.row(1, self.spec)], self.spec)
            o_packed, states = kernel(*packed.args(), cu_seqlens=cu_seqlens, output_final_state=True, **options)
            rest = problem.tokens(half, T, self.steps, self.per_step, self.spec)
            expected = torch.cat([o_ref[:1], self.oracle(rest)[0][1:]], dim=1)
            torch.testing.assert_close(o_packed.double().cpu(), expected, **bound)
            assert all(s.shape[0] == 2 for s in state_tuple(states))

    def kernel_rejects_large_heads(self, kernel) -> None:
        """A Triton kernel refuses K or V above 256 with a ValueError rather than a wrong result."""
        for K, V in ((4, 300), (300, 4)):
            problem = self.problem(2, K, V, B=1, H=1, seed=16).to(torch.float32)
            try:
                kernel(*problem.args())
            except ValueError as error:
                assert "at most 256" in str(error)
            else:
                raise AssertionError(f"K = {K}, V = {V} was accepted")

    def keyword_arguments(self) -> None:
        problem = self.problem(5, 4, 3, seed=7)
        by_position = self.naive(*problem.args(), None, None, True)
        by_name = self.naive(q=problem.q, k=problem.k, v=problem.v, **problem.inputs, scale=None,
                             initial_state=None, output_final_state=True)
        torch.testing.assert_close(by_position, by_name, rtol=0, atol=0)

    def layer(self, hidden_size: int = 32, num_heads: int = 2, T: int = 9) -> None:
        """The module (fla's layer API) runs and trains, and, with and without short convolutions and the gated
        output norm: carries its state through a cache (a prefix, then token by token, equals one call), and
        treats padding as absent (left- and right-padded rows equal their sequences alone, prefill and
        decoding)."""
        layer_api_checks(self.layer_class, hidden_size, num_heads, T)


def _padded_batch(x: torch.Tensor, lengths, left) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded rows, attention mask): row b holds x[b, :lengths[b]] after left[b] padding positions."""
    mask = torch.zeros(x.shape[:2], dtype=torch.long)
    padded = torch.zeros_like(x)
    for b, (n, start) in enumerate(zip(lengths, left)):
        mask[b, start:start + n] = 1
        padded[b, start:start + n] = x[b, :n]
    return padded, mask


def layer_packed_kernel_checks(layer_module, layer_class, hidden_size: int = 32, num_heads: int = 2, T: int = 21) -> None:
    """An attention layer on a padded batch without a cache (training) runs all its sequences in one launch of
    its Triton kernels (as on a GPU; here forced, under the interpreter): in float32, each row equals its
    sequence alone (the streaming PyTorch form), outputs and input gradients."""
    torch.manual_seed(0)
    layer = layer_class(hidden_size=hidden_size, num_heads=num_heads, layer_idx=0)
    lengths, left = (T - 5, T - 2), (5, 0)
    x = torch.randn(2, T, hidden_size)
    padded, mask = _padded_batch(x, lengths, left)
    padded.requires_grad_(True)
    original = layer_module._packed_in_triton
    calls = []
    layer_module._packed_in_triton = lambda q: calls.append(q.shape) or True
    try:
        y, _, _ = layer(padded, attention_mask=mask)
    finally:
        layer_module._packed_in_triton = original
    assert calls, "the packed kernel path was not taken"
    y.square().sum().backward()
    for b in range(2):
        row = x[b:b + 1, :lengths[b]].clone().requires_grad_(True)
        alone, _, _ = layer(row)
        assert_within(y[b:b + 1, left[b]:left[b] + lengths[b]], alone.double(), 1e-4, f"padded row {b}")
        alone.square().sum().backward()
        assert_within(padded.grad[b:b + 1, left[b]:left[b] + lengths[b]], row.grad.double(), 1e-4,
                      f"padded row {b}'s input gradient")


def layer_api_checks(layer_class, hidden_size: int, num_heads: int, T: int) -> None:
    """See LayerChecks.layer: shared by every generated layer."""
    torch.manual_seed(0)
    # The layer's default form, and its token loop with the options on (modes: every one the layer has).
    modes = getattr(sys.modules[layer_class.__module__], "MODES", ("",))
    for options in ({}, {"use_short_conv": True, "conv_size": 3, "use_output_gate": True, "mode": "naive"}):
        if options.get("mode") not in (None, *modes):
            options.pop("mode")
        # The output norm divides by the output's size: where an output is tiny (an ill-posed fit), it scales
        # the ops' float64 rounding up by as much as 1/sqrt(eps) ~ 300.
        tolerance = dict(atol=1e-6, rtol=1e-6) if options else _tolerance(torch.float64)
        layer = layer_class(hidden_size=hidden_size, num_heads=num_heads, layer_idx=0, **options).double()
        x = torch.randn(2, T, hidden_size, dtype=torch.float64, requires_grad=True)
        y, attentions, cache = layer(x)
        assert y.shape == x.shape and torch.isfinite(y).all() and attentions is None and cache is None
        y.square().mean().backward()
        for name, parameter in layer.named_parameters():
            assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name
        assert x.grad is not None and x.grad.abs().sum() > 0
        with torch.no_grad():
            x = x.detach()
            # A cache: a prefix, then the rest one token at a time, equals the whole in one call.
            y_1, _, cache = layer(x[:, :4], use_cache=True)
            pieces = [y_1]
            for t in range(4, T):
                y_t, _, cache = layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)
                pieces.append(y_t)
            torch.testing.assert_close(torch.cat(pieces, dim=1), y.detach(), **tolerance,
                                       msg=lambda m: f"{options}: decoding with the cache: {m}")
            # Padding: row 0 is left-padded by 3, row 1 right-padded by 2; each equals its sequence alone.
            lengths, left = (T - 3, T - 2), (3, 0)
            padded, mask = _padded_batch(x, lengths, left)
            y_padded, _, cache = layer(padded, attention_mask=mask, use_cache=True)
            for b in range(2):
                alone, _, _ = layer(x[b:b + 1, :lengths[b]])
                torch.testing.assert_close(y_padded[b:b + 1, left[b]:left[b] + lengths[b]], alone, **tolerance,
                                           msg=lambda m, b=b: f"{options}: padded row {b}: {m}")
                assert (y_padded[b, :left[b]] == 0).all() and (y_padded[b, left[b] + lengths[b]:] == 0).all()
            # Decoding after a padded prefill: the next token of each row continues its own sequence.
            step = torch.randn(2, 1, hidden_size, dtype=torch.float64)
            y_next, _, _ = layer(step, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                                 past_key_values=cache, use_cache=True)
            for b in range(2):
                whole, _, _ = layer(torch.cat([x[b:b + 1, :lengths[b]], step[b:b + 1]], dim=1))
                torch.testing.assert_close(y_next[b:b + 1], whole[:, -1:], **tolerance,
                                           msg=lambda m, b=b: f"{options}: decoding row {b} after padding: {m}")


@contextlib.contextmanager
def online_kernels_forced(chunk_module, read_out_apart: bool | None = None):
    """A nonlinear memory's chunk_module calls its Triton kernels (`online_triton`) whatever the device, with
    their read-out apart from the walk or in it where read_out_apart says (None: as the kernels choose)."""
    kernels = importlib.import_module(chunk_module.__package__ + ".online_triton")
    originals = chunk_module._in_triton, kernels.read_out_apart
    chunk_module._in_triton = lambda q, v, training: True
    if read_out_apart is not None:
        kernels.read_out_apart = lambda *args: read_out_apart
    try:
        yield
    finally:
        chunk_module._in_triton, kernels.read_out_apart = originals


class OnlineChecks:
    """Checks one generated nonlinear memory (regressor class `mlp`) against `oracle.solve_online`: the spec's
    mini-batch optimiser run token by token with autograd gradients of each token's loss."""

    def __init__(self, spec_path: Path, naive, chunk, layer_class):
        self.spec = load_spec(spec_path)
        self.naive, self.chunk, self.layer_class = naive, chunk, layer_class
        self.names = oracle.mlp_weight_names(self.spec)
        self.state_names = oracle.online_state_names(self.spec)
        self.batch = self.spec.optimiser.batch_size

    def problem(self, T: int, K: int, B: int = 2, H: int = 2, seed: int = 0,
                positions: list[int] | None = None, calm: bool = False) -> tuple[Problem, tuple]:
        """Random inputs (V = K) and a random initial state: weights at the scale of a trained network's, and
        momenta, all float64. With `positions` (one per sequence), the whole state of sequences that far into
        a mini-batch: random start weights and gradient sums too. `calm`: step sizes and forgetting fractions
        scaled down (`_CALMER`). At the typical ones a memory without a norm (Titans') diverges within
        hundreds of tokens, in float64 too, and a diverging memory amplifies every rounding: long sequences and
        half precision are checked where the memory stays bounded (and does not forget itself to zero)."""
        generator = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float64)

        q, v = randn(B, T, H, K), randn(B, T, H, K)
        k = F.normalize(randn(B, T, H, K), dim=-1)
        inputs = {}
        for spec_input in self.spec.inputs:
            shape = {"BTH": (B, T, H), "HK": (H, K)}[_INPUT_SHAPES[spec_input.shape]]
            inputs[spec_input.name] = _TYPICAL_VALUE[spec_input.role](randn(*shape), generator)
            if calm and spec_input.role in _CALMER:
                inputs[spec_input.name] = inputs[spec_input.name] * _CALMER[spec_input.role]
        depth, hidden = self.spec.regressor.depth, (self.spec.regressor.hidden or 1) * K
        weights = []
        for name in self.names:  # W, b or W1, b1, ..., Wn, bn
            layer = int(name[1:] or 1)
            rows, columns = (K if layer == 1 else hidden), (K if layer == depth else hidden)
            weights.append(randn(B, H, rows if name[0] == "W" else 1, columns) * rows ** -0.5)
        weights = tuple(weights)
        momenta = tuple(0.1 * randn(*w.shape) for w in weights) if self.spec.optimiser.momentum else ()
        state = weights + momenta
        if positions is not None and self.batch > 1:
            starts = tuple(w + 0.1 * randn(*w.shape) for w in weights)
            sums = tuple(randn(*w.shape) for w in weights) if self.spec.optimiser.step_size_per == "row" else ()
            state += starts + sums + (torch.tensor(positions, dtype=torch.int64) % self.batch,)
        return Problem(q, k, v, inputs), state

    def oracle(self, problem: Problem, initial, scale: float | None = None):
        return oracle.solve_online(self.spec, problem.q, problem.k, problem.v, problem.inputs, initial, scale)

    def _compare(self, found, expected, tolerance: dict, what: str) -> None:
        (o, final), (o_ref, final_ref) = found, expected
        assert o.shape == o_ref.shape and o.dtype == o_ref.dtype, f"{what}: output {o.shape} {o.dtype}"
        torch.testing.assert_close(o, o_ref, **_at_scale(tolerance, o_ref), msg=lambda m: f"{what} output: {m}")
        assert len(final) == len(final_ref) == len(self.state_names), f"{what}: {len(final)} state parts"
        for name, part, part_ref in zip(self.state_names, final, final_ref, strict=True):
            torch.testing.assert_close(part, part_ref, **_at_scale(tolerance, part_ref),
                                       msg=lambda m, name=name: f"{what} {name}: {m}")

    def matches_oracle(self, op_name: str, T: int, K: int) -> None:
        """naive_<name> or chunk_<name> equals the oracle in float64: outputs and every part of the final
        state, with the default and a custom scale, from the weights alone (a mini-batch's start) and from a
        whole state whose sequences are at different points of their mini-batches."""
        op = {"naive": self.naive, "chunk": self.chunk}[op_name]
        for positions in (None, [1, self.batch - 1]):
            problem, initial = self.problem(T, K, seed=T, positions=positions)
            for scale in (None, 0.37):
                found = op(*problem.args(), scale=scale, initial_state=initial, output_final_state=True)
                self._compare(found, self.oracle(problem, initial, scale), _tolerance(torch.float64),
                              f"{op_name} from positions {positions}")

    def split_matches_oracle(self, op_name: str, K: int = 6) -> None:
        """Any split of the sequences into calls, each from the state the one before returns, equals the oracle
        over the whole: cuts inside and at the ends of mini-batches, and a stretch of one token per call (decoding)."""
        op = {"naive": self.naive, "chunk": self.chunk}[op_name]
        T = 2 * self.batch + 5
        problem, initial = self.problem(T, K, seed=4)
        expected = self.oracle(problem, initial)
        for cuts in ([self.batch], [1, 2, 3, self.batch + 1, T - 2], [self.batch // 2 + 1, self.batch + 3]):
            cuts = sorted(set(cuts))
            state, outputs = initial, []
            for start, stop in zip([0, *cuts], [*cuts, T]):
                o, state = op(*problem.tokens(start, stop, 1, set(), self.spec).args(), initial_state=state,
                              output_final_state=True)
                outputs.append(o)
            self._compare((torch.cat(outputs, dim=1), state), expected, _tolerance(torch.float64),
                          f"{op_name} in calls cut at {cuts}")
        _, no_state = op(*problem.args(), initial_state=initial)
        assert no_state is None

    def packed_sequences(self, lengths=(1, 20, 37, 16), K: int = 6) -> None:
        """cu_seqlens: each sequence from its own initial state and with its own mini-batches, against the
        oracle run on each alone."""
        packed, initial, cu_seqlens = self._packed_problem(lengths, K, seed=10)
        o, final = self.chunk(*packed.args(), initial_state=initial, output_final_state=True, cu_seqlens=cu_seqlens)
        self._compare((o, final), self._oracle_per_sequence(packed, initial, cu_seqlens), _tolerance(torch.float64),
                      "packed")

    def _packed_problem(self, lengths, K: int, seed: int, calm: bool = False) -> tuple[Problem, tuple, torch.Tensor]:
        """Sequences of the given lengths packed along T (per-head inputs shared), each with its own random
        initial state: (the packed problem, the states a row per sequence, cu_seqlens); `calm`: see `problem`."""
        parts = [self.problem(n, K, B=1, seed=seed + i, calm=calm) for i, n in enumerate(lengths)]
        packed, cu_seqlens = pack(share_per_head_inputs([p for p, _ in parts], self.spec), self.spec)
        return packed, tuple(torch.cat(states) for states in zip(*(s for _, s in parts))), cu_seqlens

    def _oracle_per_sequence(self, packed: Problem, initial, cu_seqlens: torch.Tensor):
        """The oracle run on each packed sequence alone from its own rows of the state, joined as packed
        (differentiable with respect to the packed inputs and the state)."""
        bounds = cu_seqlens.tolist()
        runs = []
        for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            inputs = {n: (x[:, start:stop] if x.dim() == 3 else x) for n, x in packed.inputs.items()}
            alone = Problem(packed.q[:, start:stop], packed.k[:, start:stop], packed.v[:, start:stop], inputs)
            runs.append(self.oracle(alone, tuple(part[i:i + 1] for part in initial)))
        return (torch.cat([o for o, _ in runs], dim=1),
                tuple(torch.cat(parts) for parts in zip(*(final for _, final in runs))))

    def gradients_match_oracle(self, T: int = 21, K: int = 4) -> None:
        """d(loss)/d(every input and every initial-state part) through chunk_<name> equals the gradient
        through the oracle (autograd through autograd's own inner gradients), from a mini-batch's start and
        from a state carried into the middle of one."""
        for positions in (None, [max(1, self.batch // 2)]):
            self._gradients_match_oracle(T, K, positions)

    def _gradients_match_oracle(self, T: int, K: int, positions: list[int] | None) -> None:
        problem, initial = self.problem(T, K, B=1, seed=5, positions=positions)
        generator = torch.Generator().manual_seed(6)
        d_out = torch.randn(1, T, 2, K, dtype=torch.float64, generator=generator)
        d_final = [torch.randn(x.shape, dtype=torch.float64, generator=generator) for x in initial]
        names = ["q", "k", "v", *problem.inputs, *(f"initial {n}" for n in self.state_names[:len(initial)])]
        differentiable = [x.is_floating_point() for x in (*problem.args(), *initial)]

        def gradients(run):
            leaves = [x.clone().requires_grad_(grad) for x, grad in zip((*problem.args(), *initial), differentiable)]
            arguments = Problem(*leaves[:3], dict(zip(problem.inputs, leaves[3:3 + len(problem.inputs)])))
            o, final = run(arguments, tuple(leaves[3 + len(problem.inputs):]))
            loss = (o * d_out).sum() + sum((f * d).sum() for f, d in zip(final, d_final) if f.is_floating_point())
            return torch.autograd.grad(loss, [x for x in leaves if x.requires_grad])

        found = gradients(lambda p, s: self.chunk(*p.args(), initial_state=s, output_final_state=True))
        expected = gradients(lambda p, s: self.oracle(p, s))
        names = [n for n, grad in zip(names, differentiable, strict=True) if grad]
        for name, g, g_ref in zip(names, found, expected, strict=True):
            torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=1e-7,
                                       msg=lambda m, name=name: f"from positions {positions}: d/d{name}: {m}")

    def float32_close_to_oracle(self, T: int = 40, K: int = 16) -> None:
        """chunk_<name> in float32 stays within float32 rounding of the float64 oracle (relative to the largest)."""
        problem, initial = self.problem(T, K, seed=7)
        o, final = self.chunk(*problem.to(torch.float32).args(), initial_state=tuple(x.float() for x in initial),
                              output_final_state=True)
        o_ref, final_ref = self.oracle(problem, initial)
        assert o.dtype == torch.float32
        assert_within(o, o_ref, 1e-4, "float32 output")
        for name, part, part_ref in zip(self.state_names, final, final_ref, strict=True):
            if part.is_floating_point():
                assert_within(part, part_ref, 1e-4, f"float32 final state {name}")
            else:
                assert torch.equal(part, part_ref), f"float32 final state {name}: {part} != {part_ref}"

    def layer_trains(self, hidden_size: int = 32, num_heads: int = 2) -> None:
        """The layer maps [B, T, D] to [B, T, D] through chunk_<name>, and one backward reaches every
        parameter (the initial fast weights, the layer norm's, the projections) with finite gradients; fla's
        layer API (a cache through calls cut inside a mini-batch, then token by token; padding) as every layer
        (`layer_api_checks`); packed sequences (cu_seqlens) each start from the learned weights, as separate
        calls do."""
        torch.manual_seed(0)
        layer = self.layer_class(hidden_size=hidden_size, num_heads=num_heads).double()
        x = torch.randn(2, 2 * self.batch + 3, hidden_size, dtype=torch.float64)
        y, _, cache = layer(x, use_cache=True)
        assert y.shape == x.shape and len(cache[0]["recurrent_state"]) == len(self.state_names)
        y.square().mean().backward()
        for name, parameter in layer.named_parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().sum() > 0, f"{name} gets no gradient"
        layer_api_checks(self.layer_class, hidden_size, num_heads, T=2 * self.batch + 3)
        half = self.batch
        with torch.no_grad():
            packed = torch.cat([x[:1, :half], x[1:, :half + 3]], dim=1)
            y_packed, _, _ = layer(packed, cu_seqlens=torch.tensor([0, half, 2 * half + 3]))
            y_alone = torch.cat([layer(x[:1, :half])[0], layer(x[1:, :half + 3])[0]], dim=1)
            torch.testing.assert_close(y_packed, y_alone, **_tolerance(torch.float64))

    def triton_matches_oracle(self, chunk_module, T: int = 37, K: int = 16, tf32: bool = False,
                              read_out_apart: bool | None = None) -> None:
        """chunk_<name> without gradients on its Triton kernel (`online_triton`, the GPU's inference path; here
        forced, under the interpreter on a CPU), in float32 against the oracle in float64, outputs and every
        part of the final state: from the weights, through calls cut at and inside mini-batches (the state
        carried), and packed sequences (cu_seqlens) from their own weights, each at its own length; and with
        bfloat16 inputs, the float32 state as the PyTorch form computes it (no state rounded to bfloat16).
        `tf32`: the kernel runs compiled, where its products of half-precision inputs take TensorFloat-32
        operands (the interpreter's are float32): that check then runs at calm rates, to tf32's rounding.
        `read_out_apart`: the read-out in its own launch from checkpoints (True) or in the walk (False), forced;
        None leaves the choice to the kernels."""
        with online_kernels_forced(chunk_module, read_out_apart):
            self._triton_matches_oracle(chunk_module, T, K, tf32)

    def _triton_matches_oracle(self, chunk_module, T: int, K: int, tf32: bool) -> None:
        chunk = torch.no_grad()(self.chunk)  # the kernel's path: no gradient asked for
        T = max(T, self.batch + 8)  # room for the cuts below

        def close(found, expected, what):
            (o, final), (o_ref, final_ref) = found, expected
            assert_within(o, o_ref, 1e-4, f"Triton {what} output")
            for name, part, part_ref in zip(self.state_names, final, final_ref, strict=True):
                if part.is_floating_point():
                    assert_within(part, part_ref, 1e-4, f"Triton {what} final state {name}")
                else:
                    assert torch.equal(part.cpu(), part_ref), f"Triton {what} final state {name}: {part} != {part_ref}"

        # A deep memory without a norm can diverge past float32's range at typical rates (10^50 within 37 tokens:
        # no float32 computation follows it there); such a memory is checked at calm rates.
        calm = not self._bounded_in_float32(*self.problem(T, K, seed=31))
        problem, initial = self.problem(T, K, seed=31, calm=calm)
        weights = tuple(x.float() for x in initial)
        expected = self.oracle(problem, initial)
        close(chunk(*problem.to(torch.float32).args(), initial_state=weights, output_final_state=True), expected,
              "from the weights")
        state, outputs = weights, []
        cuts = [self.batch, self.batch + 5, T]  # the second call starts at a mini-batch's start, the third inside one
        for start, stop in zip([0, *cuts[:-1]], cuts):
            o, state = chunk(*problem.tokens(start, stop, 1, set(), self.spec).to(torch.float32).args(),
                             initial_state=state, output_final_state=True)
            outputs.append(o)
        close((torch.cat(outputs, dim=1), state), expected, f"in calls cut at {cuts}")

        # bfloat16 inputs with a float32 state: the state stays float32, as chunk.py's PyTorch form keeps it (a
        # state rounded to bfloat16 is off by 2e-2). Both sides round in float32, in other orders: through a
        # deep memory (three layers with GELU and a layer norm) that reaches 2e-5, so the bound is the float32
        # checks' 1e-4. tf32's operands carry 11 bits: a diverging memory (Titans' at typical rates) amplifies
        # their rounding past 1e-2, a calm one keeps it near 2^-11.
        if tf32:
            problem, initial = self.problem(T, K, seed=31, calm=True)
            weights = tuple(x.float() for x in initial)
        low = problem.to(torch.bfloat16)
        found = chunk(*low.args(), initial_state=weights, output_final_state=True)
        forced, chunk_module._in_triton = chunk_module._in_triton, lambda q, v, training: False
        try:
            expected_low = chunk(*low.args(), initial_state=weights, output_final_state=True)
        finally:
            chunk_module._in_triton = forced
        assert found[0].dtype == torch.bfloat16 and all(x.dtype == torch.float32 for x in found[1][:-1])
        for name, part, part_ref in zip(self.state_names, found[1], expected_low[1]):
            if part.is_floating_point():
                assert_within(part, part_ref.double(), 2e-3 if tf32 else 1e-4,
                              f"Triton bfloat16 inputs: final state {name}")

        packed, initial, cu_seqlens = self._packed_problem((1, self.batch + 4, T, self.batch), K, seed=40, calm=calm)
        found = chunk(*packed.to(torch.float32).args(), initial_state=tuple(x.float() for x in initial),
                      output_final_state=True, cu_seqlens=cu_seqlens)
        close(found, self._oracle_per_sequence(packed, initial, cu_seqlens), "packed")

    def _bounded_in_float32(self, problem: Problem, initial) -> bool:
        """Whether the oracle's outputs and final state stay well inside float32's range (below 1e30)."""
        o, final = self.oracle(problem, initial)
        return all(x.abs().max() < 1e30 for x in (o, *final) if x.is_floating_point())

    def triton_gradients_match_oracle(self, chunk_module, T: int = 37, K: int = 16,
                                      read_out_apart: bool | None = None) -> None:
        """Training on the Triton kernels (`online_triton`: the forward with checkpoints, the backward walking
        the mini-batches in reverse with the derived reverse mode; here forced, under the interpreter), in
        float32: the gradient of a loss on the outputs and every part of the final state with respect to q,
        k, v, every input and every initial-state part equals the oracle's (float64, autograd through
        autograd's inner gradients), for two sequences ending inside a mini-batch and for packed sequences; then
        float16 inputs (their gradients in float16, the state's in float32) against the oracle of the rounded
        inputs."""
        with online_kernels_forced(chunk_module, read_out_apart):
            T = max(T, self.batch + 5)
            problem, initial = self.problem(T, K, seed=51)
            self._triton_gradients(problem, initial, None, "two sequences")
            packed, initial, cu_seqlens = self._packed_problem((1, self.batch + 4, T, self.batch), K, seed=60)
            self._triton_gradients(packed, initial, cu_seqlens, "packed")
            # Half-precision rows: each row's gradient is stored in its input's dtype, dk and dv after their two
            # shares are summed in float32 (float16 here: the interpreter's bfloat16 products are wrong).
            problem, initial = self.problem(T, K, seed=53, calm=True)
            self._triton_gradients(problem.to(torch.float16).to(torch.float64), initial, None, "float16 inputs",
                                   torch.float16)

    def _triton_gradients(self, problem: Problem, initial, cu_seqlens, what: str,
                          dtype: torch.dtype = torch.float32) -> None:
        generator = torch.Generator().manual_seed(52)
        d_out = torch.randn(*problem.q.shape[:3], problem.v.shape[-1], dtype=torch.float64, generator=generator)

        def loss(o, final):
            value = (o * d_out.to(o.dtype)).sum()
            for i, part in enumerate(final):
                if part.is_floating_point():
                    d = torch.randn(part.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(70 + i))
                    value = value + (part * d.to(part.dtype)).sum()
            return value

        def leaves(rows_dtype, state_dtype):
            args = [x.to(rows_dtype).clone().requires_grad_(True) for x in problem.args()]
            state = [x.to(state_dtype).clone().requires_grad_(True) for x in initial]
            return args, state

        args, state = leaves(dtype, torch.float32)  # the state is float32 whatever the rows' dtype
        o, final = self.chunk(*args, initial_state=tuple(state), output_final_state=True, cu_seqlens=cu_seqlens)
        assert len(final) == len(self.state_names)
        found = torch.autograd.grad(loss(o, final), [*args, *state])
        assert all(g.dtype == x.dtype for g, x in zip(found, [*args, *state])), f"{what}: gradients' dtypes"
        args_ref, state_ref = leaves(torch.float64, torch.float64)
        p = Problem(*args_ref[:3], dict(zip(problem.inputs, args_ref[3:])))
        o_ref, final_ref = (self.oracle(p, tuple(state_ref)) if cu_seqlens is None
                            else self._oracle_per_sequence(p, tuple(state_ref), cu_seqlens))
        expected = torch.autograd.grad(loss(o_ref, final_ref), [*args_ref, *state_ref])
        names = ["q", "k", "v", *problem.inputs, *(f"initial {n}" for n in self.state_names)]
        bound = 1e-3 if dtype == torch.float32 else 4e-3  # float16's rounding of each stored gradient: 2^-11
        for name, g, g_ref in zip(names, found, expected):
            assert_within(g, g_ref, bound, f"Triton training, {what}: d/d{name}")


# --- context parallelism (context_parallel_<name>), checked in processes of a gloo group ----------------------

def context_parallel_layers(generated: Path) -> list[str]:
    """The generated layers with a `context_parallel_<name>`."""
    return sorted(p.parent.name for p in generated.glob("*/context_parallel.py"))


def free_address() -> str:
    """A rendezvous address for a fresh process group on this machine: a free local port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def context_parallel_matches(layers: list[tuple[str, str]], ranks: int, device: str = "cpu") -> None:
    """`context_parallel_worker` in `ranks` processes of a fresh gloo group, for the generated packages in
    `layers`: (package directory, spec path) pairs; on `device` ("cuda": every process on the one GPU)."""
    import torch.multiprocessing as mp

    mp.spawn(context_parallel_worker, args=(ranks, free_address(), layers, device), nprocs=ranks, join=True)


def context_parallel_worker(rank: int, ranks: int, address: str, layers: list[tuple[str, str]],
                            device: str = "cpu") -> None:
    """One process of a gloo group of `ranks`: each layer's `context_parallel_<name>` (layers: (package
    directory, spec path) pairs) on this rank's shard against `chunk_<name>` on the whole sequences in this
    process: outputs, final states and the gradients of every input and of the initial state, batch rows and
    packed sequences that cross the shards' ends (one over three shards at four ranks, one ending at a shard's
    end, an empty one), with and without a loss on the final state (see `_ShardedRun` for what `device` sets)."""
    run = _ON_CPU if device == "cpu" else _ON_GPU
    with gloo_group(rank, ranks, address):
        for package_dir, spec_path in layers:
            _context_parallel_matches(Path(package_dir), Path(spec_path), rank, ranks, run)


@dataclass(frozen=True)
class _ShardedRun:
    """Where and at what sizes a context-parallel check runs: on the CPU in float64 at small sizes, to rounding;
    on a GPU in float32 at the kernels' sizes (K = 16, chunks of 16 that the shards' ends cut), to 1e-3 of each
    reference's scale (the kernels round in other orders over other cuts of the sequence)."""

    device: str
    dtype: torch.dtype
    shard: int  # tokens per rank
    K: int
    chunk: int  # the chunked op's chunk size (attention: its block size)

    def to(self, tensors) -> list[torch.Tensor]:
        """Fresh leaves on the device, floating ones in the run's dtype and needing gradients."""
        return [x.detach().to(self.device, self.dtype if x.is_floating_point() else x.dtype)
                .requires_grad_(x.is_floating_point()) for x in tensors]

    def noise(self, shape, generator: torch.Generator) -> torch.Tensor:
        """A standard normal draw (float64 on the CPU, the same numbers on any device), in the run's dtype."""
        return torch.randn(shape, dtype=torch.float64, generator=generator).to(self.device, self.dtype)

    def close(self, found, expected, rtol: float, what: str) -> None:
        """found against expected: in float64 to `rtol` (and 1e-10), in float32 to the run's scale."""
        if isinstance(expected, (tuple, list)):  # a state's parts, each at its own scale
            for index, (part, part_ref) in enumerate(zip(found, expected, strict=True)):
                self.close(part, part_ref, rtol, f"{what} part {index}")
            return
        tolerance = ({"rtol": rtol, "atol": 1e-10} if self.dtype == torch.float64
                     else _at_scale({"rtol": 1e-3, "atol": 1e-3}, expected))
        torch.testing.assert_close(found, expected, **tolerance, msg=lambda m: f"{what}: {m}")


_ON_CPU = _ShardedRun("cpu", torch.float64, shard=6, K=4, chunk=4)
_ON_GPU = _ShardedRun("cuda", torch.float32, shard=40, K=16, chunk=16)


@contextlib.contextmanager
def gloo_group(rank: int, ranks: int, address: str):
    """This process as `rank` of a gloo process group of `ranks` (the default group) while the block runs. A
    collective one rank misses fails within a minute instead of hanging the check."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=ranks,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield
        # Every rank past its last collective before any tears the group down: a rank that destroyed it while
        # another's asynchronous work (FSDP2's) was still in flight aborted that process now and then.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _context_parallel_cases(run: _ShardedRun, ranks: int) -> list[tuple[str, int, torch.Tensor | None, bool]]:
    """(what, B, cu_seqlens on the run's device, whether a loss reads the final state) for shards of `run.shard`
    tokens: batch rows, and packed sequences that cross the shards' ends (at four ranks one over three shards,
    one ending at a shard's end, an empty one), each with and without that loss (without, rank 0's output reads
    nothing the other ranks send, and its backward must still join theirs)."""
    shard = run.shard
    T = shard * ranks
    lengths = [5, T - 5] if ranks == 2 else [3, shard - 3, 0, 2 * shard + 1, T - 3 * shard - 1]
    packed = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=run.device)
    return [("batch rows", 2, None, True), ("batch rows, outputs only", 2, None, False),
            (f"packed {lengths}", 1, packed, True), (f"packed {lengths}, outputs only", 1, packed, False)]


def _context_parallel_matches(package_dir: Path, spec_path: Path, rank: int, ranks: int,
                              run: _ShardedRun) -> None:
    from .fuzz import _import_package

    if load_spec(spec_path).regressor.cls == "mlp":  # a nonlinear memory: its state is its fast weights
        _context_parallel_online_matches(_import_package(package_dir), spec_path, rank, ranks, run)
        return
    checks = LayerChecks(spec_path, None, None)
    name = checks.spec.name
    package = _import_package(package_dir)
    if not hasattr(package, f"chunk_{name}"):  # an attention layer: its state is its cache
        _context_parallel_attention_matches(package, checks, rank, ranks, run)
        return
    split, checks.chunk = getattr(package, f"context_parallel_{name}"), getattr(package, f"chunk_{name}")
    checks.naive = getattr(package, f"naive_{name}")
    parts = checks.state_parts()  # Titans' (S, Z): 2
    shard, K, H = run.shard, run.K, 2
    T = shard * ranks
    for what, B, cu_seqlens, with_final in _context_parallel_cases(run, ranks):
        # Packed at V = the stacked state's key width too: the probe's values as wide as the layer's.
        V = (3 if run.device == "cpu" else K) if cu_seqlens is None else parts * K
        problem = checks.problem(T, K, V, B=B, H=H, seed=7)
        N = B if cu_seqlens is None else len(cu_seqlens) - 1
        initial = list(state_tuple(checks.run_end_state(problem, K, V, seed=9, B=N, H=H)))
        generator = torch.Generator().manual_seed(8)
        d_o = run.noise((B, T, H, V), generator)
        d_final = [run.noise(x.shape, generator) * with_final for x in initial]

        def state(tensors):  # as the op takes it: one tensor, or a tuple of parts
            return tensors[0] if parts == 1 else tuple(tensors)
        leaves = run.to((*problem.args(), *initial))
        whole = Problem(*leaves[:3], dict(zip(problem.inputs, leaves[3:-parts])))
        o_ref, final_ref = checks.chunk(*whole.args(), initial_state=state(leaves[-parts:]), output_final_state=True,
                                        cu_seqlens=cu_seqlens, chunk_size=run.chunk)
        final_ref = state_tuple(final_ref)
        grads_ref = torch.autograd.grad((o_ref * d_o).sum() + sum((f * d).sum() for f, d in zip(final_ref, d_final)),
                                        leaves)

        mine = run.to((*problem.args(), *initial))
        local = Problem(*mine[:3], dict(zip(problem.inputs, mine[3:-parts]))).tokens(
            rank * shard, (rank + 1) * shard, checks.steps, checks.per_step, checks.spec)
        o, final = split(*local.args(), initial_state=state(mine[-parts:]), output_final_state=with_final,
                         cu_seqlens=cu_seqlens, chunk_size=run.chunk)
        rows = slice(rank * shard, (rank + 1) * shard)
        label = f"{name} {what}, rank {rank} of {ranks}"
        run.close(o, o_ref[:, rows], 1e-10, f"{label} output")
        loss = (o * d_o[:, rows]).sum()
        if with_final:
            final = state_tuple(final)
            run.close(final, final_ref, 1e-10, f"{label} final")
            if rank == 0:
                loss = loss + sum((f * d).sum() for f, d in zip(final, d_final))
        else:
            assert final is None
        grads = torch.autograd.grad(loss, mine)
        names = ["q", "k", "v", *problem.inputs, *(f"initial_state[{i}]" for i in range(parts))]
        for arg, g, g_ref in zip(names, grads, grads_ref, strict=True):
            if arg in ("q", "k", "v") or (arg in problem.inputs and checks.spec.input(arg).per_token):
                steps = checks.steps if arg in ("k", "v") or arg in checks.per_step else 1
                g_ref = g_ref[:, rank * shard * steps:(rank + 1) * shard * steps]
                g = g[:, rank * shard * steps:(rank + 1) * shard * steps]
            elif arg.startswith("initial_state") and g.shape[-1] == g.shape[-2] == K:
                # A K x K state (a covariance) is symmetric: only its gradient's symmetric part acts on it, and
                # two correct runs may split the rest differently (RLS's P k against P^T k).
                g, g_ref = symmetric_part(g), symmetric_part(g_ref)
            run.close(g, g_ref, 1e-9, f"{label} d{arg}")


def _context_parallel_online_matches(package, spec_path: Path, rank: int, ranks: int, run: _ShardedRun) -> None:
    """A nonlinear memory's `context_parallel_<name>` (a pipeline over the ranks) on this rank's shard against
    `chunk_<name>` on the whole sequences in this process: outputs, every part of the final state and
    the gradients of every input and of the initial state's weights. Each sequence starts from a whole state
    part-way into a mini-batch (start weights, gradient sums and its position: what the pipeline hands on, as a
    shard's end falls inside a mini-batch), for batch rows and for packed sequences that cross the shards' ends."""
    checks = OnlineChecks(spec_path, None, None, None)
    name = checks.spec.name
    split, chunk = getattr(package, f"context_parallel_{name}"), getattr(package, f"chunk_{name}")
    shard, K, H = run.shard, run.K, 2
    T = shard * ranks
    for what, B, cu_seqlens, with_final in _context_parallel_cases(run, ranks):
        problem, _ = checks.problem(T, K, B=B, H=H, seed=7, calm=run.device != "cpu")
        N = B if cu_seqlens is None else len(cu_seqlens) - 1
        initial = list(checks.problem(1, K, B=N, H=H, seed=9, positions=[(3 * n + 1) for n in range(N)])[1])
        floating = [x.is_floating_point() for x in initial]
        count = 3 + len(problem.inputs)

        leaves = run.to((*problem.args(), *initial))
        o_ref, final_ref = chunk(*leaves[:count], initial_state=tuple(leaves[count:]), output_final_state=True,
                                 cu_seqlens=cu_seqlens)
        generator = torch.Generator().manual_seed(8)
        d_o = run.noise(o_ref.shape, generator)
        d_final = [run.noise(x.shape, generator) * with_final if x.is_floating_point() else None for x in final_ref]
        wrt = [x for x in leaves if x.requires_grad]
        grads_ref = torch.autograd.grad((o_ref * d_o).sum() + sum((f * d).sum() for f, d in zip(final_ref, d_final)
                                                                  if d is not None), wrt)

        mine = run.to((*problem.args(), *initial))
        local = Problem(*mine[:3], dict(zip(problem.inputs, mine[3:count]))).tokens(
            rank * shard, (rank + 1) * shard, 1, set(), checks.spec)
        o, final = split(*local.args(), initial_state=tuple(mine[count:]), output_final_state=with_final,
                         cu_seqlens=cu_seqlens)
        rows = slice(rank * shard, (rank + 1) * shard)
        label = f"{name} {what}, rank {rank} of {ranks}"
        run.close(o, o_ref[:, rows], 1e-9, f"{label} output")
        loss = (o * d_o[:, rows]).sum()
        if with_final:
            for index, (part, part_ref) in enumerate(zip(final, final_ref, strict=True)):
                run.close(part, part_ref, 1e-9, f"{label} final state part {index}")
            if rank == 0:
                loss = loss + sum((f * d).sum() for f, d in zip(final, d_final) if d is not None)
        else:
            assert final is None
        grads = torch.autograd.grad(loss, [x for x in mine if x.requires_grad])
        names = ["q", "k", "v", *problem.inputs, *(f"initial_state[{i}]" for i, f in enumerate(floating) if f)]
        for arg, g, g_ref in zip(names, grads, grads_ref, strict=True):
            if arg in ("q", "k", "v") or (arg in problem.inputs and checks.spec.input(arg).per_token):
                g_ref, g = g_ref[:, rows], g[:, rows]
            run.close(g, g_ref, 1e-8, f"{label} d{arg}")


def _context_parallel_attention_matches(package, checks: LayerChecks, rank: int, ranks: int,
                                       run: _ShardedRun) -> None:
    """An attention layer's `context_parallel_<name>` on this rank's shard against `naive_<name>` on the whole
    sequences in this process: outputs, final states (the cache of every token) and the gradients of
    every input and of the initial cache; batch rows from a cache of earlier tokens, and packed sequences that
    cross the shards' ends (one over three shards at four ranks, one ending at a shard's end, an empty one), each
    with and without a loss on the final state."""
    name = checks.spec.name
    split, naive = getattr(package, f"context_parallel_{name}"), getattr(package, f"naive_{name}")
    shard, K, V, H = run.shard, run.K, 3 if run.device == "cpu" else run.K, 2
    T = shard * ranks
    for what, B, cu_seqlens, with_final in _context_parallel_cases(run, ranks):
        problem = checks.problem(T, K, V, B=B, H=H, seed=7)
        # A cache of three earlier tokens for batch rows (packed sequences start from none).
        initial = [] if cu_seqlens is not None else list(checks._cache_parts(checks.problem(3, K, V, B=B, H=H,
                                                                                             seed=9))[1])
        leaves = run.to((*problem.args(), *initial))
        whole = Problem(*leaves[:3], dict(zip(problem.inputs, leaves[3:len(leaves) - len(initial)])))
        if cu_seqlens is None:
            o_ref, final_ref = naive(*whole.args(), initial_state=tuple(leaves[len(leaves) - len(initial):]),
                                     output_final_state=True)
        else:  # each sequence alone; the final state is the packed rows' cache
            bounds = cu_seqlens.tolist()
            o_ref = torch.cat([naive(*whole.tokens(a, b, 1, set(), checks.spec).args())[0]
                               for a, b in zip(bounds[:-1], bounds[1:]) if b > a], dim=1)
            final_ref = checks._cache_parts(whole)[1]
        generator = torch.Generator().manual_seed(8)
        d_o = run.noise(o_ref.shape, generator)
        d_final = [run.noise(x.shape, generator) * with_final for x in final_ref]
        grads_ref = torch.autograd.grad((o_ref * d_o).sum() + sum((f * d).sum() for f, d in zip(final_ref, d_final)),
                                        leaves, allow_unused=True)

        mine = run.to((*problem.args(), *initial))
        local = Problem(*mine[:3], dict(zip(problem.inputs, mine[3:len(mine) - len(initial)]))).tokens(
            rank * shard, (rank + 1) * shard, 1, set(), checks.spec)
        o, final = split(*local.args(), initial_state=tuple(mine[len(mine) - len(initial):]) or None,
                         output_final_state=with_final, cu_seqlens=cu_seqlens, block_size=run.chunk)
        rows = slice(rank * shard, (rank + 1) * shard)
        label = f"{name} {what}, rank {rank} of {ranks}"
        run.close(o, o_ref[:, rows], 1e-10, f"{label} output")
        loss = (o * d_o[:, rows]).sum()
        if with_final:
            torch.testing.assert_close(tuple(final), tuple(final_ref), rtol=0, atol=0,
                                       msg=lambda m: f"{label} final: {m}")
            if rank == 0:
                loss = loss + sum((f * d).sum() for f, d in zip(final, d_final))
        else:
            assert final is None
        grads = torch.autograd.grad(loss, mine, allow_unused=True)
        names = ["q", "k", "v", *problem.inputs, *(f"initial_state[{i}]" for i in range(len(initial)))]
        for arg, g, g_ref in zip(names, grads, grads_ref, strict=True):
            g, g_ref = (torch.zeros_like(x) if d is None else d for x, d in ((mine[names.index(arg)], g),
                                                                             (leaves[names.index(arg)], g_ref)))
            if arg in ("q", "k", "v") or (arg in problem.inputs and checks.spec.input(arg).per_token):
                g_ref, g = g_ref[:, rows], g[:, rows]
            run.close(g, g_ref, 1e-9, f"{label} d{arg}")


# --- sharded training (DDP, FSDP2), checked in processes of a gloo group ----------------------------------------

SHARDED_LAYERS = ["gated_delta_rule", "kda", "mesa_cg", "ttt_linear", "softmax_attention"]  # one of each family


def sharded_training_worker(rank: int, ranks: int, address: str, names: list[str], wrapping: str) -> None:
    """One process of a gloo group of `ranks`: a model of two generated layers and a linear head takes a
    training step under `wrapping` ("ddp", "fsdp2", or "ddp_compiled": DDP around torch.compile, whose
    aot_eager backend traces the layers without a C compiler) on this rank's share of the batch, against the
    same model on the whole batch in this process (float64): the loss (averaged over the ranks) and every
    parameter's gradient (DDP's and FSDP2's are means over the ranks, as the whole batch's mean loss has them)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    with gloo_group(rank, ranks, address):
        for name in names:
            package = importlib.import_module(f"generated.{name}")
            layer_class = getattr(package, load_spec(Path(package.__file__).parents[2] / "specs" / f"{name}.yaml")
                                  .camel_name)

            def model() -> torch.nn.Module:
                torch.manual_seed(0)
                return torch.nn.Sequential(_Mixer(layer_class(hidden_size=16, num_heads=2)),
                                           _Mixer(layer_class(hidden_size=16, num_heads=2, layer_idx=1)),
                                           torch.nn.Linear(16, 3)).double()
            generator = torch.Generator().manual_seed(1)
            x = torch.randn(2 * ranks, 19, 16, dtype=torch.float64, generator=generator)
            y = torch.randn(2 * ranks, 19, 3, dtype=torch.float64, generator=generator)
            whole = model()
            loss_ref = torch.nn.functional.mse_loss(whole(x), y)
            grads_ref = torch.autograd.grad(loss_ref, list(whole.parameters()))

            mine = model()
            if wrapping == "fsdp2":
                from torch.distributed.fsdp import fully_shard
                for block in mine[:2]:
                    fully_shard(block)
                fully_shard(mine)
                wrapped = mine
            else:
                wrapped = DistributedDataParallel(torch.compile(mine, backend="aot_eager")
                                                  if wrapping == "ddp_compiled" else mine)
            rows = slice(2 * rank, 2 * rank + 2)
            loss = torch.nn.functional.mse_loss(wrapped(x[rows]), y[rows])
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
            label = f"{name} under {wrapping}, rank {rank} of {ranks}"
            torch.testing.assert_close(total / ranks, loss_ref.detach(), rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"{label} loss: {m}")
            for (what, p), g_ref in zip(mine.named_parameters(), grads_ref, strict=True):
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12, msg=lambda m, w=what: f"{label} d{w}: {m}")


class _Mixer(torch.nn.Module):
    """A generated layer as a block of a model: its output alone, added to its input."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer(x)[0]


# rls_triton's settings as FORWARD:BACKWARD[:GAINS[:CHUNK[:PRODUCTS[:LOOPS]]]] (rls_kernel_settings), the ones its
# tests run: each forward with each backward but the token loop's forward with the chunk backward, chunks both ways
# with their gains by eliminating columns and by each warp eliminating its own copy, and each way's gains in loops
# that run instead of unrolled ones.
RLS_KERNEL_SETTINGS = ("chunks:chunks", "chunks:tokens", "tokens:tokens", "chunks:chunks:columns",
                       "chunks:chunks:warps", "chunks:chunks:rows:16:tf32x3:running",
                       "chunks:tokens:columns:16:tf32x3:running", "chunks:chunks:warps:16:tf32x3:running")


def rls_kernel_settings(setting: str) -> dict:
    """rls_triton's module settings from FORWARD:BACKWARD[:GAINS[:CHUNK[:PRODUCTS[:LOOPS]]]], e.g. "chunks:tokens",
    every one of them: those the string leaves out take fixed values (rows, 16, tf32x3, unrolled), so that a setting
    names the same kernels whatever ran before it: {"FORWARD": ..., "BACKWARD": ..., "GAINS": ..., ...}."""
    forward, backward, *given = setting.split(":")
    gains, chunk, products, loops = given + ["rows", "16", "tf32x3", "unrolled"][len(given):]
    return {"FORWARD": forward, "BACKWARD": backward, "GAINS": gains, "CHUNK": int(chunk), "PRODUCTS": products,
            "LOOPS": loops}


def symmetric_part(x: torch.Tensor) -> torch.Tensor:
    """The symmetric part of a K x K matrix: of a covariance rounded off symmetry, or of its gradient (the only part
    that acts on a symmetric state)."""
    return (x + x.transpose(-1, -2)) / 2


def _weighted_ridge(q, k, v, g, w, S, P, scale):
    """Recursive least squares' regression solved outright at every token (float64, autograd): after t tokens
    the memory minimises sum_(s<=t) w_s (A_t/A_s) |v_s - M^T k_s|^2 + A_t tr((M - S)^T P^-1 (M - S)), A_t the
    product of the decays e^g so far, so M_t = H_t^-1 (A_t P^-1 S + sum w_s (A_t/A_s) k_s v_s^T) with
    H_t = A_t P^-1 + sum w_s (A_t/A_s) k_s k_s^T; o_t = M_t^T (scale q_t); the final state (M_T, H_T^-1).
    q, k: [B, T, H, K], v: [B, T, H, V], g, w: [B, T, H], S: [B, H, K, V], P: [B, H, K, K]."""
    prior = torch.linalg.inv(P)
    logs = torch.cumsum(g, dim=1)
    outputs = []
    for t in range(q.shape[1]):
        kept = w[:, :t + 1] * torch.exp(logs[:, t:t + 1] - logs[:, :t + 1])  # [B, t + 1, H]
        decay = torch.exp(logs[:, t])[..., None, None]  # [B, H, 1, 1]
        H_t = decay * prior + torch.einsum("bsh,bshi,bshj->bhij", kept, k[:, :t + 1], k[:, :t + 1])
        M_t = torch.linalg.solve(H_t, decay * prior @ S + torch.einsum("bsh,bshi,bshj->bhij", kept, k[:, :t + 1],
                                                                       v[:, :t + 1]))
        outputs.append(torch.einsum("bhkv,bhk->bhv", M_t, scale * q[:, t]))
    return torch.stack(outputs, dim=1), M_t, torch.linalg.inv(H_t)
