"""Stage 1: spec loading and validation; every class of bad input has a snapshot of its message."""

from pathlib import Path

import pytest

from ttr_codegen.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
BAD = sorted((ROOT / "tests" / "bad_specs").glob("*.yaml"))


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_spec_message(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # messages name the file as given, relative to the repository
    relative = path.relative_to(ROOT)
    with pytest.raises(SpecError) as caught:
        load_spec(relative)
    expected = path.with_suffix(".expected").read_text()
    assert str(caught.value) + "\n" == expected


def test_there_is_a_fixture_for_every_class_of_error():
    assert {p.stem for p in BAD} >= {"yaml_syntax", "unknown_key", "wrong_type", "undeclared_input", "wrong_role",
                                     "missing_required", "unsupported_combination", "unsupported_regressor"}


@pytest.mark.parametrize("path", sorted((ROOT / "specs").glob("*.yaml")), ids=lambda p: p.stem)
def test_catalogue_specs_are_valid(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    assert spec.description


def test_all_errors_are_reported_at_once_with_positions():
    text = "name: x\nregressor: linear\noptimiser:\n  method: exact\nreadout: {scale: -2, normalise: maybe}\n"
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "x.yaml")
    lines = [d.format().splitlines()[0] for d in caught.value.diagnostics]
    assert lines == [
        "x.yaml:4:3: error: optimiser.ridge: method 'exact' needs 'ridge' for class 'linear'",
        "x.yaml:5:18: error: readout.scale: expected 'default' or a positive number, got int -2",
        "x.yaml:5:33: error: readout.normalise: unknown normalisation 'maybe'",
    ]


def test_optimiser_may_be_a_bare_method_name():
    spec = parse_spec("name: la\nregressor: linear\noptimiser: gradient_step_from_zero\n")
    assert spec.optimiser.method == "gradient_step_from_zero"


def test_empty_and_missing_files():
    with pytest.raises(SpecError, match="the spec is empty"):
        parse_spec("", "empty.yaml")
    with pytest.raises(SpecError, match="cannot read the spec"):
        load_spec(ROOT / "specs" / "no_such_layer.yaml")


def test_duplicate_keys_are_errors():
    with pytest.raises(SpecError, match="duplicate key"):
        parse_spec("name: a\nname: b\nregressor: linear\noptimiser: exact\n")


def test_a_derivation_failure_is_reported_at_the_field(monkeypatch, tmp_path):
    """When the derivation cannot handle a choice, the message names the spec field's file:line:col."""
    from ttr_codegen import pipeline
    from ttr_codegen.derive import DerivationError

    def refuse(spec):
        raise DerivationError("optimiser.step_size", "the system matrix is not identity plus rank one",
                              "use a loss whose Hessian is c I + s u w^T")

    monkeypatch.setattr(pipeline, "derive", refuse)
    path = tmp_path / "longhorn.yaml"
    path.write_text((ROOT / "specs" / "longhorn.yaml").read_text())
    with pytest.raises(SpecError) as caught:
        pipeline.derive_spec(path)
    (diagnostic,) = caught.value.diagnostics
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "step_size: beta" in text)
    assert diagnostic.format().startswith(f"{path}:{line}:3: error: optimiser.step_size: the system matrix")
    assert "help: use a loss whose Hessian" in diagnostic.format()


def test_a_per_token_ridge_is_refused():
    text = ("name: x\ninputs: {lamb: {shape: [B, T, H], role: ridge}}\nregressor: linear\n"
            "optimiser: {method: exact, ridge: lamb}\n")
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "x.yaml")
    assert [d.format().splitlines()[0] for d in caught.value.diagnostics] == [
        "x.yaml:4:28: error: optimiser.ridge: the ridge must be fixed per head: shape [H] or [H, K]"]


@pytest.mark.parametrize(("solver", "expected"), [
    ("{method: cg}", "x.yaml:4:48: error: optimiser.solver.iterations: the cg solver needs 'iterations'"),
    ("{method: cg, iterations: 0}", "x.yaml:4:73: error: optimiser.solver.iterations: expected an integer from 1 to 256, got int 0"),
    ("{method: lu}", "x.yaml:4:57: error: optimiser.solver.method: unknown solver 'lu'"),
    ("{method: exact, iterations: 3}", "x.yaml:4:76: error: optimiser.solver.iterations: the exact solver takes no iterations"),
    ("fast", "x.yaml:4:48: error: optimiser.solver: expected 'exact' or a mapping, got str 'fast'"),
])
def test_a_bad_solver_is_refused_at_its_field(solver, expected):
    text = ("name: x\nregressor: {class: local_polynomial, degree: 1}\nweights: {kernel: exp_dot}\n"
            f"optimiser: {{method: exact, ridge: 0.1, solver: {solver}}}\n")
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "x.yaml")
    assert [d.format().splitlines()[0] for d in caught.value.diagnostics] == [expected]


def test_an_iterative_solver_needs_a_k_by_k_system():
    text = ("name: x\nregressor: {class: local_polynomial, degree: 0}\nweights: {kernel: exp_dot}\n"
            "optimiser: {method: exact, solver: {method: cg, iterations: 4}}\n")
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "x.yaml")
    assert [d.format().splitlines()[0] for d in caught.value.diagnostics] == [
        "x.yaml:4:36: error: optimiser.solver: an iterative solver applies to a K x K system: a linear or affine "
        "memory's ridge solution, or a local-linear fit"]


def test_a_solver_keeps_the_math_hash_of_specs_without_one():
    text = ("name: x\nregressor: {class: local_polynomial, degree: 1}\nweights: {kernel: exp_dot}\n"
            "optimiser: {method: exact, ridge: 0.1%s}\n")
    plain, exact, cg = (parse_spec(text % extra, "x.yaml").math_hash()
                        for extra in ("", ", solver: exact", ", solver: {method: cg, iterations: 4}"))
    assert plain == exact != cg
