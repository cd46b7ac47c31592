"""Stage 3 for nonlinear memories (regressor class `mlp`): spec -> the lines the online templates render.

The memory network's forward and the derived gradients come from `derive.online`; this stage picks which
of them each generated function needs:

- `naive_<name>` runs token by token with explicit weights: each token's gradient of its own loss with
  respect to every fast weight, taken at the weights of its mini-batch's start, then the optimiser's step.
- `chunk_<name>` runs one mini-batch at a time in the dual form: the key rows' forward and the loss
  gradients at each layer's output (one batched pass at the start weights), the query rows' outputs with
  each row's weights without forming them, and the weights at the mini-batch's end.
"""

from __future__ import annotations

from dataclasses import dataclass

from .derive import dual_form, online
from .spec import Spec
from .spec.model import ROLES

NORM_EPS = 1e-6


@dataclass(frozen=True)
class OnlineInput:
    name: str
    shape_code: str  # expected shape, as code over B, T, H, K
    shape_text: str
    role: str
    role_text: str
    per_token: bool


@dataclass(frozen=True)
class FastWeight:
    name: str
    shape_code: str  # one sequence and head's shape, as code over K, V and HIDDEN
    meaning: str


@dataclass(frozen=True)
class OnlineKernel:
    """The dual form's lines for one sequence and head in a Triton kernel (online_triton.py): `tl.dot` on
    [rows, D] tiles. A mini-batch of BATCH_SIZE rows is a tile only where BATCH_SIZE is a power of two from 16
    (tl.dot's least side) to 64 (what registers hold next to the weights)."""

    # The mini-batch as tile operations (derive.dual_form): what every kernel runs, the forward's output rows
    # and end state named by `out` and `end_state`; then, for the backward kernels, its reverse mode in two
    # shares that run apart (dual_form.ReverseMode): the output rows' from their adjoints d_out, and the end
    # state's from d_<part>_end.
    forward_lines: tuple[str, ...]
    out: str
    end_state: tuple[str, ...]  # in the live state's order
    # The forward's tiles the end state's share reads: its products and row sums, which the output rows' share
    # stores for it as (name, shape over BS, K, V, HIDDEN and 1), and the element-wise lines that make the rest.
    walk_stored: tuple[tuple[str, tuple[str, str]], ...]
    walk_forward_lines: tuple[str, ...]
    # The forward's lines the output rows' share reads (with the tiles it stores for the walk back): the end
    # state is left out there.
    read_out_forward_lines: tuple[str, ...]
    read_out_lines: tuple[str, ...]
    read_out_adjoints: tuple[tuple[str, str], ...]  # (input, the name of its share): rows, state, norm, coefficients
    walk_lines: tuple[str, ...]
    walk_adjoints: tuple[tuple[str, str], ...]


KERNEL_BATCH_SIZES = (16, 32, 64)
# The training kernel's own names around the printed lines (online_triton.py.j2), which no intermediate takes.
KERNEL_NAMES = frozenset({
    "rows", "m", "n", "first", "start", "bos", "length", "i", "j", "i_n", "i_h", "i_nh", "t", "last", "step",
    "retain", "rate", "momentum", "forget", "offset", "at", "at_k", "at_v", "at_c", "batches", "scale", "keep_t",
    "in_weights", "carry_t", "decay_t", "in_momentum", "momentum_t", "tl", "triton", "H", "K", "V", "HIDDEN",
    "BS", "T", "TOTAL", "DOT", "STATE_DOT"})


@dataclass(frozen=True)
class OnlinePlan:
    name: str
    camel_name: str
    description: str
    inputs: tuple[OnlineInput, ...]
    momentum: str | None  # the momentum input
    forget: str | None  # the weight decay input: the fraction of the weights forgotten per token
    rates: tuple[str, ...]  # the code's own names of the per-token inputs: rate[, momentum][, forget]
    rate_per_row: bool  # TTT's reading: row i's rate scales the sum of the mini-batch's gradients up to i
    batch_size: int
    hidden: int | None  # the hidden layers' width / K (depth >= 2)
    residual: bool  # m(x) = x + g(x): g is fitted to v - k
    readout: str  # "input": o = q + g(q) (or g(q)); "pre_norm": o = z + g(q), z the last layer's output
    default_scale: str  # the query scale when the caller gives none: the spec's readout.scale, or K ** -0.5
    fast_weights: tuple[FastWeight, ...]
    live: tuple[str, ...]  # the state a mini-batch starts from: the fast weights, then their momenta
    states: tuple[str, ...]  # the whole state tuple: live, then what a call ending inside a mini-batch carries
    gradient_sums: bool  # the carried state holds each weight's gradient sum so far (rates per row)
    network: tuple[str, ...]  # the memory network's inputs, in signature order (x first)
    output: str  # g(x)'s value name
    last: str  # the last layer's output (before the layer norm)
    forward_lines: tuple[str, ...]  # g(x) with explicit weights
    weight_gradient_lines: tuple[str, ...]  # d_<weight> of 1/2 ||g(x) - target||^2, summed over x's rows
    delta_lines: tuple[str, ...]  # d_<layer product> per row, after forward_lines
    query_lines: tuple[str, ...]  # g at the query rows x_q with per-row weights (the dual form)
    update_lines: tuple[str, ...]  # the weights (and momenta) at the mini-batch's end
    kernel: OnlineKernel | None  # the same lines on a Triton kernel's register tiles, where the batch fits them
    description_lines: tuple[str, ...]  # the objective and optimiser, for docstrings
    input_binding: tuple[str, ...]  # the spec's inputs under the names the lines above use
    input_lines: tuple[str, ...]  # their conversion to the compute dtype and layout


def lower_online(spec: Spec) -> OnlinePlan:
    regressor, optimiser = spec.regressor, spec.optimiser
    net = online.memory_network(regressor.depth, regressor.activation, regressor.bias,
                                regressor.norm_weight is not None, NORM_EPS)
    target = net.program.input("target", online.ROWS)
    momentum = optimiser.momentum is not None
    keep = optimiser.step_size_per == "sample"  # with per-row rates the start weights are kept whole
    products = [layer.product for layer in net.layers]
    fast = tuple(_fast_weight(i, layer, w, regressor.depth) for i, layer in enumerate(net.layers)
                 for w in (layer.weight, layer.bias) if w is not None)
    live = tuple(w.name for w in fast) + (tuple(f"S_{w.name}" for w in fast) if momentum else ())
    # A mini-batch cut by a call's end: the next call needs the weights its gradients are taken at, with rates
    # per row the gradients so far, and how many of its tokens are done.
    carried = ((tuple(f"{w.name}_start" for w in fast) + (tuple(f"G_{w.name}" for w in fast) if not keep else ())
                + ("position",)) if optimiser.batch_size > 1 else ())
    inputs = tuple(OnlineInput(i.name, f"({', '.join(i.shape)}{',' if len(i.shape) == 1 else ''})", f"[{', '.join(i.shape)}]",
                               i.role, ROLES[i.role], i.per_token)
                   for i in spec.inputs)
    rates = [(own, name) for own, name in (("rate", optimiser.step_size), ("momentum", optimiser.momentum),
                                           ("forget", optimiser.weight_decay)) if name]
    binding, conversion = _input_lines(spec, rates)
    return OnlinePlan(
        name=spec.name,
        camel_name=spec.camel_name,
        description=spec.docstring_description or spec.name,
        default_scale="K ** -0.5" if spec.readout.scale is None else repr(spec.readout.scale),
        inputs=inputs,
        momentum=optimiser.momentum,
        forget=optimiser.weight_decay,
        rates=tuple(own for own, _ in rates),
        rate_per_row=not keep,
        batch_size=optimiser.batch_size,
        hidden=regressor.hidden,
        residual=regressor.residual,
        readout=spec.readout.residual,
        fast_weights=fast,
        live=live,
        states=live + carried,
        gradient_sums=not keep and optimiser.batch_size > 1,
        network=tuple(v.name for v in net.program.inputs if v is not target),
        output=net.output.name,
        last=net.layers[-1].out.name,
        forward_lines=tuple(online.forward_lines(net.program)),
        weight_gradient_lines=tuple(online.gradient_lines(net.program, net.output, target, None, net.fast_weights)),
        delta_lines=tuple(online.gradient_lines(net.program, net.output, target, None, products)),
        query_lines=tuple(online.query_lines(net, keep, momentum)),
        update_lines=tuple(online.state_update_lines(net, keep, momentum)),
        kernel=(_kernel(net, keep, momentum, regressor.residual, spec.readout.residual)
                if optimiser.batch_size in KERNEL_BATCH_SIZES else None),
        description_lines=tuple(_describe(spec, net)),
        input_binding=tuple(binding),
        input_lines=tuple(conversion),
    )


def _kernel(net: online.MemoryNetwork, keep: bool, momentum: bool, residual: bool, readout: str) -> OnlineKernel:
    batch = dual_form.minibatch(net, keep, momentum, residual, readout, KERNEL_NAMES)
    forward_ops = list(batch.program.ops)
    reverse = dual_form.backward(batch)
    # The products on the way to the end state run at the kernel's STATE_DOT (as exact as float32: TF32x3, or for
    # bfloat16 inputs three bfloat16 products where the key rows multiply the weights), the others (the
    # read-out's) at its DOT. The weights are float32 and carried over a sequence's mini-batches: TF32 would round
    # them in the key rows' forward, where the loss's residual (a small difference of that forward and the
    # target) carries the rounding into every step, and round each step, and the steps add up over the sequence
    # (Titans' bfloat16 W2 drifted 4.1e-4 from the oracle on an H100 against float32's bound of 3.4e-4 with its
    # steps at TF32). The steps (the key rows' transpose times gradients) stay TF32x3: as three bfloat16
    # products they passed ttt_linear's and ttt_mlp's GPU tests but put Titans' output 0.38 off (Triton 3.6).
    weights = {t.name for t in batch.state}
    state_path = frozenset(op.out.name for op in dual_form.needed(forward_ops, [], {t.name for t in batch.end_state})
                           if op.fn == "matmul")
    x = batch.rows["x"].name  # the key rows, as loaded: exact in the inputs' dtype
    exact_left = frozenset(op.out.name for op in forward_ops if op.fn == "matmul" and op.args[0].name == x
                           and any(a.name in weights for a in op.args))
    # The walk back is sequential: it loads the forward's products and row sums that the output rows' share
    # (a program per mini-batch, all at once) stored, and recomputes only element-wise tiles.
    stored, recomputed = dual_form.stored_replay(forward_ops, reverse.walk_ops)
    return OnlineKernel(
        forward_lines=tuple(dual_form.print_ops(forward_ops, online.TRITON, state_path, exact_left)),
        out=batch.out.name,
        end_state=tuple(t.name for t in batch.end_state),
        walk_stored=tuple((t.name, tuple("BS" if d == "n" else d for d in t.shape)) for t in stored),
        walk_forward_lines=tuple(dual_form.print_ops(recomputed, online.TRITON)),
        read_out_forward_lines=tuple(dual_form.print_ops(
            dual_form.needed(forward_ops, reverse.read_out_ops, {t.name for t in stored}), online.TRITON, state_path,
            exact_left)),
        read_out_lines=tuple(dual_form.print_ops(reverse.read_out_ops, online.TRITON)),
        read_out_adjoints=tuple((name, tile.name) for name, tile in reverse.read_out.items()),
        walk_lines=tuple(dual_form.print_ops(reverse.walk_ops, online.TRITON)),
        walk_adjoints=tuple((name, tile.name) for name, tile in reverse.walk.items()),
    )


def _input_lines(spec: Spec, rates: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(the spec's inputs bound to the generated code's own names in one assignment, the first statement, so
    that no input is read after a name it shares has been rebound; their conversion to the compute dtype).
    rates: (own name, spec input) of the per-token inputs."""
    r = spec.regressor
    norm = [("ln_weight", r.norm_weight), ("ln_bias", r.norm_bias)] if r.norm_weight else []
    renamed = [(own, name) for own, name in rates + norm if own != name]
    binding = ([f"{', '.join(o for o, _ in renamed)} = {', '.join(n for _, n in renamed)}  # the spec's inputs"]
               if renamed else [])
    own = ", ".join(o for o, _ in rates)
    conversion = [f"{own} = rate.transpose(1, 2).to(dtype)  # [B, H, T]" if len(rates) == 1 else
                  f"{own} = (x.transpose(1, 2).to(dtype) for x in ({own}))  # [B, H, T] each"]
    if norm:
        conversion.append("ln_weight, ln_bias = (x.to(dtype)[None, :, None, :] for x in (ln_weight, ln_bias))"
                          "  # [1, H, 1, K]: a row per head")
    return binding, conversion


def _fast_weight(index: int, layer: online.Layer, weight: online.Value, depth: int) -> FastWeight:
    """Layer `index` (from 0)'s weight or bias: its shape over K, V and HIDDEN, and what it is."""
    rows, columns = ("K" if index == 0 else "HIDDEN"), ("V" if index == depth - 1 else "HIDDEN")
    which = f"layer {index + 1}'s" if depth > 1 else "the"
    if weight is layer.weight:
        return FastWeight(weight.name, f"{rows}, {columns}", f"{which} weights (x {weight.name})")
    return FastWeight(weight.name, f"1, {columns}", f"{which} bias")


def _network_text(spec: Spec) -> str:
    """The network before any layer norm, as a formula: x W1 + b1, then act(...) W2 + b2, ..."""
    r = spec.regressor
    text = "x"
    for i, suffix in enumerate(online.layer_suffixes(r.depth)):
        if i > 0:
            text = f"{r.activation}({text})"
        text = f"{text} W{suffix}" + (f" + b{suffix}" if r.bias else "")
    return text


def _describe(spec: Spec, net: online.MemoryNetwork) -> list[str]:
    regressor, optimiser = spec.regressor, spec.optimiser
    z = _network_text(spec)
    g_text = f"LN({z})" if regressor.norm_weight else z
    fit = "v - k" if regressor.residual else "v"
    rate = optimiser.step_size
    lines = [f"memory: g(x) = {g_text}" + (", m(x) = x + g(x)" if regressor.residual else ", m(x) = g(x)"),
             f"loss of token t: l_t = 1/2 ||g(k_t) - ({fit.replace('v', 'v_t').replace('k', 'k_t')})||^2",
             f"mini-batches of {optimiser.batch_size} tokens: every gradient in a mini-batch is taken at the "
             "weights of its start"]
    if optimiser.step_size_per == "row":
        lines.append(f"weights read at token t: W_t = W_start - {rate}_t sum_(s <= t in the mini-batch) grad l_s(W_start)")
    elif optimiser.momentum:
        lines.append(f"per token: S_t = {optimiser.momentum}_t S_(t-1) - {rate}_t grad l_t(W_start); "
                     f"W_t = {'(1 - ' + optimiser.weight_decay + '_t) ' if optimiser.weight_decay else ''}W_(t-1) + S_t")
    else:
        lines.append(f"per token: W_t = {'(1 - ' + optimiser.weight_decay + '_t) ' if optimiser.weight_decay else ''}"
                     f"W_(t-1) - {rate}_t grad l_t(W_start)")
    read = {"input": "o_t = q_t + g(q_t)" if regressor.residual else "o_t = g(q_t)",
            "pre_norm": f"o_t = z(q_t) + g(q_t), z = {z} before the layer norm"}[spec.readout.residual]
    lines.append(f"read-out with W_t: {read} (q scaled)")
    lines.append("gradients: derived by the chain rule through the network (no autograd)")
    return lines
