"""The mini-batch dual form as tile operations (`derive.dual_form`), the base of a backward kernel for the
nonlinear memories: its reverse mode equals autograd through its own forward for every network the `mlp`
class offers, and its forward equals the generated chunked layer (itself checked against the oracle) on one
mini-batch of the catalogue's layers."""

import importlib

import pytest
import torch

from ttr_codegen.derive import dual_form, online
from ttr_codegen.derive.online import TORCH

SIZES = {"n": 5, "K": 4, "V": 3, "HIDDEN": 6, "1": 1}

# (depth, activation, bias, layer norm): TTT-Linear's, TTT-MLP's, Titans' memory, and three layers with SiLU.
NETWORKS = [(1, None, True, True), (2, "gelu_tanh", True, True), (2, "silu", False, False), (3, "silu", True, False),
            (1, None, False, False)]
OPTIMISERS = [(False, False), (True, False), (True, True)]  # (keep, momentum): rates per row, per sample, momentum


def _run(code: str, values: dict) -> dict:
    scope = {"torch": torch, **values}
    exec(code, scope)
    return scope


# A layer norm's width is K (its inputs are [H, K]), so it comes with residual memories (V = K) only.
CASES = [(*network, *optimiser, residual) for network in NETWORKS for optimiser in OPTIMISERS
         for residual in (False, True) if residual or not network[3]]


@pytest.mark.parametrize(("depth", "activation", "bias", "layer_norm", "keep", "momentum", "residual"), CASES)
def test_reverse_mode_equals_autograd(depth, activation, bias, layer_norm, keep, momentum, residual):
    """d(<out, d_out> + sum <end part, d_end part>) / d(every input) of one mini-batch, derived, against
    autograd through the same forward (float64, batched over two sequences)."""
    net = online.memory_network(depth, activation, bias, layer_norm)
    batch = dual_form.minibatch(net, keep, momentum, residual, "pre_norm" if layer_norm else "input")
    forward = "\n".join(dual_form.print_ops(list(batch.program.ops), TORCH))
    reverse = dual_form.backward(batch)
    seeds = [reverse.d_out, *reverse.d_ends]
    generator = torch.Generator().manual_seed(depth + 10 * keep + 100 * momentum)
    sizes = dict(SIZES, V=SIZES["K"] if residual else SIZES["V"])
    leaves = {t.name: (0.5 * torch.randn(2, *(sizes[a] for a in t.shape), dtype=torch.float64,
                                         generator=generator)).requires_grad_(True)
              for t in batch.program.inputs if t not in seeds}
    scope = _run(forward, leaves)
    results = [scope[batch.out.name], *(scope[t.name] for t in batch.end_state)]
    d = [torch.randn(r.shape, dtype=torch.float64, generator=generator) for r in results]
    names = sorted(set(reverse.read_out) | set(reverse.walk))
    expected = torch.autograd.grad(sum((r * g).sum() for r, g in zip(results, d)), [leaves[n] for n in names],
                                   allow_unused=True)
    assert set(names) == set(leaves), f"no adjoint for {set(leaves) - set(names)}"
    # Each share runs on the forward and its own seeds alone (as the kernels run them apart); their sum is
    # the adjoint.
    given = {**{n: x.detach() for n, x in leaves.items()}, **{s.name: g for s, g in zip(seeds, d)}}
    shares = [(_run(forward + "\n" + "\n".join(dual_form.print_ops(ops, TORCH)), given), adjoints)
              for ops, adjoints in ((reverse.read_out_ops, reverse.read_out), (reverse.walk_ops, reverse.walk))]
    for name, g in zip(names, expected):
        found = sum(scope[adjoints[name].name].expand_as(leaves[name]) for scope, adjoints in shares
                    if name in adjoints)
        torch.testing.assert_close(found, g if g is not None else torch.zeros_like(found), rtol=1e-10, atol=1e-12,
                                   msg=lambda m, name=name: f"d/d{name}: {m}")


@pytest.mark.parametrize("name", ["ttt_linear", "ttt_mlp", "titans_mlp"])
def test_forward_equals_the_generated_layer(name):
    """One whole mini-batch from a given state: the tile program's output rows and end state equal
    chunk_<name>'s (float64), with the optimiser's coefficients from the generated `mixing`."""
    package = importlib.import_module(f"generated.{name}")
    chunk = importlib.import_module(f"generated.{name}.chunk")
    naive = importlib.import_module(f"generated.{name}.naive")
    from ttr_codegen.lower_online import lower_online
    from ttr_codegen.spec import load_spec

    spec = load_spec(f"specs/{name}.yaml")
    plan = lower_online(spec)
    r = spec.regressor
    net = online.memory_network(r.depth, r.activation, r.bias, r.norm_weight is not None)
    keep, momentum = not plan.rate_per_row, plan.momentum is not None
    batch = dual_form.minibatch(net, keep, momentum, plan.residual, plan.readout)
    n, K, H = plan.batch_size, 8, 2
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, H, K, dtype=torch.float64, generator=generator) for _ in range(3))
    rates = {"step_size": lambda: 0.1 * torch.rand(1, n, H, dtype=torch.float64, generator=generator),
             "momentum": lambda: 0.9 * torch.rand(1, n, H, dtype=torch.float64, generator=generator),
             "forget": lambda: 0.1 * torch.rand(1, n, H, dtype=torch.float64, generator=generator),
             "norm_weight": lambda: 1 + 0.1 * torch.randn(H, K, dtype=torch.float64, generator=generator),
             "norm_bias": lambda: 0.1 * torch.randn(H, K, dtype=torch.float64, generator=generator)}
    inputs = [rates[i.role]() for i in spec.inputs]
    hidden = (r.hidden or 1) * K
    shapes = {"K": K, "V": K, "HIDDEN": hidden, "1": 1}
    state = tuple(0.3 * torch.randn(1, H, *(shapes[a] for a in t.shape), dtype=torch.float64, generator=generator)
                  for t in batch.state)
    o, final = getattr(package, f"chunk_{name}")(q, k, v, *inputs, initial_state=state, output_final_state=True)

    own = dict(zip([i.name for i in spec.inputs], inputs))
    per_row = [own[spec.optimiser.step_size]] + ([own[spec.optimiser.momentum]] if momentum else []) + (
        [own[spec.optimiser.weight_decay]] if spec.optimiser.weight_decay else [])
    coefficients = chunk.mixing(*(chunk.by_mini_batch(x.transpose(1, 2)) for x in per_row))
    names = ["mix"] if plan.rate_per_row else (["keep", "carry", "mix", "decay", "push"] if momentum else ["keep", "mix"])
    coefficients = dict(zip(names, coefficients if isinstance(coefficients, tuple) else (coefficients,)))
    mix = coefficients["mix"][:, :, 0]
    values = {"x": k.transpose(1, 2), "v": v.transpose(1, 2), "x_q": q.transpose(1, 2) * K ** -0.5,
              "mix": mix, "mix_end": mix[..., -1, :, None]}
    if keep:
        values |= {"keep": coefficients["keep"][:, :, 0], "keep_end": coefficients["keep"][:, :, 0, -1:, :]}
    if momentum:
        carry = coefficients["carry"][:, :, 0]
        values |= {"carry": carry, "carry_end": carry[..., -1:, :],
                   "decay_end": coefficients["decay"][:, :, 0, -1:, :],
                   "push_end": coefficients["push"][:, :, 0, -1, :, None]}
    for t, x in zip(batch.state, state):
        values[t.name] = x
    for t, x in zip(batch.fixed, inputs[:2] if batch.fixed else []):
        values[t.name] = x[None, :, None, :]
    scope = _run("\n".join(dual_form.print_ops(batch.program.ops, TORCH)), values)
    torch.testing.assert_close(scope[batch.out.name].transpose(1, 2), o, rtol=1e-10, atol=1e-12)
    for t, part in zip(batch.end_state, final):
        torch.testing.assert_close(scope[t.name], part, rtol=1e-10, atol=1e-12)
    assert naive.BATCH_SIZE == n  # the generated module's mini-batch is the one run here


def test_layer_norm_gradient_sums_at_once():
    """A layer-normed memory's loss gradient waits on three reductions one after another (the forward's mean
    and variance, then the backward's sums at once), not four: shallow_row_sum rewrote the sum that spreads
    the mean's adjoint so that it no longer waits for the variance's. The forward keeps only operations the
    read-out, the end state or the loss gradients read."""
    net = online.memory_network(1, None, True, True)
    batch = dual_form.minibatch(net, False, False, True, "pre_norm")
    program = batch.program
    assert [program.depth(t) for t in batch.deltas] == [3]
    plain = dual_form.TileProgram()
    a, c = plain.input("a", ("n", "K")), plain.input("c", ("n", dual_form.ONE))
    deep = plain.mul("deep", a, plain.row_sum("s", a))  # a times a column that is itself a reduction
    total = plain.add("t", plain.mul("ac", a, c), deep)
    assert plain.depth(total) + 1 == 2  # summed as it stands: after s
    assert plain.depth(plain.shallow_row_sum("r", total)) == 1  # sum(a) c + sum(a) s, s reused: at once
    kept = dual_form.needed(program.ops, [], {batch.out.name, *(t.name for t in batch.end_state),
                                              *(t.name for t in batch.deltas)})
    assert kept == program.ops


def test_centred_rows_sum_to_zero():
    """A row sum of rows centred on their own mean folds to zero, and so do the terms it scales: a layer norm's
    gradient (and its reverse mode) sums no centred rows, in any layer-normed memory. Elsewhere a sum stays."""
    plain = dual_form.TileProgram()
    z, c = plain.input("z", ("n", "K")), plain.input("c", ("n", dual_form.ONE))
    centred = plain.sub("centred", z, plain.row_mean("mean", z))
    zero = plain.row_sum("s", centred)
    flipped = plain.sub("flipped", plain.row_mean("mean", z), z)  # the mean's tile again, minus the rows
    assert plain.is_zero(zero) and plain.is_zero(plain.row_mean("m", flipped))
    assert plain.add("a", c, plain.mul("p", zero, c)) == c  # c + 0 c
    assert plain.sub("d", zero, c) == plain.neg("minus_c", c)
    assert plain.is_zero(plain.spread("spread", zero, z))
    assert not plain.is_zero(plain.row_sum("other", plain.sub("off", z, c)))  # centred on another column
    for depth, activation in ((1, None), (2, "gelu_tanh")):
        net = online.memory_network(depth, activation, True, True)
        batch = dual_form.minibatch(net, False, False, True, "pre_norm")
        reverse = dual_form.backward(batch)
        program = batch.program
        for op in program.ops:
            if op.fn in ("row_sum", "row_mean"):
                assert program._row_mean_column(op.args[0]) is None, op
        kept = dual_form.needed(program.ops, [], {batch.out.name, *(t.name for t in batch.end_state)})
        assert not [op for op in kept + reverse.read_out_ops + reverse.walk_ops if op.fn == "zeros"]  # all folded


@pytest.mark.parametrize(("depth", "activation", "bias", "layer_norm", "keep", "momentum", "residual"), CASES)
def test_walk_back_on_stored_tiles(depth, activation, bias, layer_norm, keep, momentum, residual):
    """The walk back as the kernels run it (dual_form.stored_replay): the forward's products and row sums
    loaded as the output rows' kernel stored them, only element-wise lines recomputed; its adjoints are those
    of the end state's share over the whole forward, and it recomputes no product or reduction."""
    net = online.memory_network(depth, activation, bias, layer_norm)
    batch = dual_form.minibatch(net, keep, momentum, residual, "pre_norm" if layer_norm else "input")
    forward_ops = list(batch.program.ops)
    reverse = dual_form.backward(batch)
    stored, recomputed = dual_form.stored_replay(forward_ops, reverse.walk_ops)
    assert stored and all(op.fn not in ("matmul", *dual_form.REDUCTIONS) for op in recomputed)
    generator = torch.Generator().manual_seed(7 + depth)
    sizes = dict(SIZES, V=SIZES["K"] if residual else SIZES["V"])
    given = {t.name: 0.5 * torch.randn(2, *(sizes[a] for a in t.shape), dtype=torch.float64, generator=generator)
             for t in batch.program.inputs}
    walk = "\n".join(dual_form.print_ops(reverse.walk_ops, TORCH))
    whole = _run("\n".join(dual_form.print_ops(forward_ops, TORCH)) + "\n" + walk, given)
    loaded = {t.name: whole[t.name] for t in stored}  # what the output rows' kernel, which runs it all, stores
    part = _run("\n".join(dual_form.print_ops(recomputed, TORCH)) + "\n" + walk, {**given, **loaded})
    for name, tile in reverse.walk.items():
        torch.testing.assert_close(part[tile.name], whole[tile.name], rtol=1e-12, atol=1e-14,
                                   msg=lambda m, name=name: f"d/d{name}: {m}")


@pytest.mark.parametrize("name", ["ttt_linear", "ttt_mlp", "titans_mlp"])
def test_state_products_precision(name):
    """Every product on the way to the end state goes through _state_dot (the weights' carried precision); the
    bfloat16 split of an exact left operand only where the key rows multiply the weights (the steps' three
    bfloat16 products put Titans' output 0.38 off on an H100); the read-out's products stay at DOT."""
    from ttr_codegen.lower_online import lower_online
    from ttr_codegen.spec import load_spec
    from pathlib import Path

    plan = lower_online(load_spec(Path(__file__).resolve().parents[1] / "specs" / f"{name}.yaml"))
    lines = plan.kernel.forward_lines
    state = [line for line in lines if "_state_dot(" in line]
    exact = [line for line in state if line.endswith(", STATE_DOT, True)")]
    assert exact and all(line.split(" = ")[1].startswith("_state_dot(x, W") for line in exact)
    steps = [line for line in lines if "_step = " in line and "dot(" in line]  # the weights' steps (not biases')
    assert steps and all("_state_dot(tl.trans(" in line and line.endswith("False)") for line in steps)
    read_out = [line for line in lines if line.split(" = ")[0].endswith(("_q_read", "_q_scores", "_q_moved"))]
    assert read_out and all("tl.dot(" in line for line in read_out)
