"""Generated ops check their arguments first: a table of bad inputs against every op of several generated
layers, each refused with a ValueError that names the op and the argument; empty batches and sequences
(B = 0, T = 0) give empty results."""

import importlib

import pytest
import torch

# (layer, op, how its state is made); each op takes (q, k, v, *inputs, scale=, initial_state=, ...).
OPS = [
    ("delta_rule", "naive_delta_rule"), ("delta_rule", "chunk_delta_rule"),
    ("delta_rule", "fused_recurrent.fused_recurrent_delta_rule"), ("delta_rule", "chunk_triton.chunk_delta_rule_triton"),
    ("gla", "naive_gla"), ("gla", "chunk_gla"), ("gla", "chunk_triton.chunk_gla_triton"),
    ("titans_linear", "naive_titans_linear"), ("titans_linear", "chunk_titans_linear"),
    ("mesa", "naive_mesa"), ("mesa", "chunk_mesa"),
    ("softmax_attention", "naive_softmax_attention"), ("softmax_attention", "flash_softmax_attention"),
    ("local_linear_attention", "naive_local_linear_attention"),
    ("ttt_linear", "naive_ttt_linear"), ("ttt_linear", "chunk_ttt_linear"),
]
B, T, H, K, V = 2, 10, 2, 4, 4  # V = K: the residual mlp memories need it


def resolve(layer: str, op: str):
    module, _, name = op.rpartition(".")
    package = importlib.import_module(f"generated.{layer}" + (f".{module}" if module else ""))
    return getattr(package, name)


def good_inputs(layer: str) -> tuple[list, dict]:
    from ttr_codegen.spec import load_spec

    spec = load_spec(f"specs/{layer}.yaml")
    generator = torch.Generator().manual_seed(0)
    sizes = {"B": B, "T": T, "H": H, "K": K}
    args = [torch.randn(B, T, H, K, generator=generator), torch.nn.functional.normalize(
        torch.randn(B, T, H, K, generator=generator), dim=-1), torch.randn(B, T, H, V, generator=generator)]
    inputs = {}
    for i in spec.inputs:
        x = torch.rand(*(sizes[d] for d in i.shape), generator=generator) * 0.5 + 0.25
        inputs[i.name] = -x if i.role == "log_decay" else x
    return args, inputs


def state_of(op, args, inputs, rows: int):
    """A state of the op's own kind, from a short run (rows: how many sequences it has)."""
    q, k, v = (x[:1].repeat(rows, *[1] * (x.dim() - 1)) for x in args)
    per_row = {n: (x[:1].repeat(rows, *[1] * (x.dim() - 1)) if x.dim() >= 3 else x) for n, x in inputs.items()}
    return op(q, k, v, *per_row.values(), output_final_state=True)[1]


def bad_cases(args, inputs):
    q, k, v = args
    yield "q", dict(q=q[0])
    yield "k", dict(k=k[:1])
    yield "v", dict(v=v[:, :7])
    for name, x in inputs.items():  # a per-token input of another batch, a per-head one of other heads
        yield name, {name: x[:1] if x.dim() >= 3 else x[:1]}
    yield "scale", dict(scale=float("nan"))
    yield "scale", dict(scale=-1.0)


PACKED_CASES = [  # (what is wrong, cu_seqlens)
    ("cu_seqlens", torch.tensor([0.0, 4.0, 10.0])),
    ("cu_seqlens", torch.tensor([1, 4, 10])),
    ("cu_seqlens", torch.tensor([0, 4, 9])),
    ("cu_seqlens", torch.tensor([0, 6, 4, 10])),
    ("cu_seqlens", torch.tensor([[0, 10]])),
]


def call(op, args, inputs, **changes):
    values = dict(zip("qkv", args)) | inputs | changes
    positional = [values.pop(n) for n in ["q", "k", "v", *inputs]]
    return op(*positional, **values)


def takes(op, argument: str) -> bool:
    import inspect

    return argument in inspect.signature(op).parameters


@pytest.mark.parametrize(("layer", "op_name"), OPS, ids=[op for _, op in OPS])
def test_bad_arguments_are_named(layer, op_name):
    op = resolve(layer, op_name)
    args, inputs = good_inputs(layer)
    short = op_name.rpartition(".")[2]
    for argument, change in bad_cases(args, inputs):
        with pytest.raises(ValueError, match=rf"{short}: .*{argument}|{short}: {argument}") as caught:
            call(op, args, inputs, **change)
        assert argument in str(caught.value)
    if takes(op, "chunk_size"):
        for size in (0, 2 ** 20, 1.5):
            with pytest.raises(ValueError, match=rf"{short}: chunk_size"):
                call(op, args, inputs, chunk_size=size)
    if takes(op, "cu_seqlens"):
        packed_args = [x[:1] for x in args]
        packed_inputs = {n: (x[:1] if x.dim() >= 3 else x) for n, x in inputs.items()}
        for argument, cu_seqlens in PACKED_CASES:
            with pytest.raises(ValueError, match=rf"{short}: {argument}"):
                call(op, packed_args, packed_inputs, cu_seqlens=cu_seqlens)
        with pytest.raises(ValueError, match=rf"{short}: cu_seqlens .*B must be 1"):
            call(op, args, inputs, cu_seqlens=torch.tensor([0, 4, 10]))
        one_row = state_of(op, args, inputs, 1)
        with pytest.raises(ValueError, match=rf"{short}: initial_state"):  # one row for two sequences
            call(op, packed_args, packed_inputs, cu_seqlens=torch.tensor([0, 4, 10]), initial_state=one_row)
    state = state_of(op, args, inputs, B)
    wrong = tuple(x[0] for x in state) if isinstance(state, tuple) else state[0]  # the batch axis dropped
    with pytest.raises(ValueError, match=rf"{short}: initial_state"):
        call(op, args, inputs, initial_state=wrong)


@pytest.mark.parametrize(("layer", "op_name"), OPS, ids=[op for _, op in OPS])
@pytest.mark.parametrize("empty", ["B", "T"])
def test_empty_batches_and_sequences(layer, op_name, empty):
    op = resolve(layer, op_name)
    args, inputs = good_inputs(layer)
    axis = 0 if empty == "B" else 1
    cut = [x.narrow(axis, 0, 0) for x in args]
    cut_inputs = {n: (x.narrow(axis, 0, 0) if x.dim() >= 3 else x) for n, x in inputs.items()}
    initial = None
    if empty == "T" and layer in ("ttt_linear",):
        initial = state_of(op, args, inputs, B)
    o, state = call(op, cut, cut_inputs, output_final_state=True, initial_state=initial)
    assert o.shape == (*cut[0].shape[:3], V)
