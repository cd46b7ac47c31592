"""Spec-space fuzzing (a fixed-seed slice; `python -m ttr_codegen.fuzz` runs long campaigns): every drawn spec
is refused with a diagnostic, or every generated op matches the oracle. Failures a campaign found stay here
as fixtures (tests/fuzz_regressions)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ttr_codegen.fuzz import _import_package, _renamed, _simpler, _submodule, check_document, missing_fast_paths
from ttr_codegen.pipeline import compile_spec
from ttr_codegen.render.writer import plan_changes, write_atomically
from ttr_codegen.spec import SpecError

def _fixed_slice() -> list[dict]:
    # Drawn in a fresh interpreter: hypothesis's draws can depend on what the process imported before.
    code = "import json; from ttr_codegen.fuzz import spread_slice; print(json.dumps(spread_slice(25, seed=2026)))"
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


SLICE = _fixed_slice()
REGRESSIONS = sorted((Path(__file__).parent / "fuzz_regressions").glob("*.yaml"))


@pytest.mark.parametrize("index", range(len(SLICE)))
def test_a_drawn_spec_is_refused_or_right(index, tmp_path):
    outcome = check_document(SLICE[index], tmp_path)
    assert outcome.status != "failed", f"{outcome.check}: {outcome.error}\n{yaml.safe_dump(SLICE[index])}"
    if outcome.status == "refused":
        assert ": error: " in outcome.error  # a compiler diagnostic: file:line:col: error: field: message


def test_the_slice_covers_the_schema(tmp_path):
    """The slice is no toy: it spans the regressor classes and the optimisers, and most of it compiles."""
    classes = {d["regressor"] if isinstance(d["regressor"], str) else d["regressor"]["class"] for d in SLICE}
    methods = {d["optimiser"]["method"] for d in SLICE}
    assert len(SLICE) == 25 and len(classes) >= 4 and len(methods) >= 5, (classes, methods)
    compiled = 0
    for index, document in enumerate(SLICE):
        path = tmp_path / f"spec{index}.yaml"
        path.write_text(yaml.safe_dump(document))
        try:
            compile_spec(path, tmp_path / "out")
            compiled += 1
        except SpecError:
            pass
    assert compiled >= len(SLICE) // 2, f"only {compiled} of {len(SLICE)} drawn specs compile"


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.stem for p in REGRESSIONS])
def test_regression_fixture(path, tmp_path):
    """A spec a campaign once broke: now refused with a diagnostic (the file's comment says which) or right."""
    outcome = check_document(yaml.safe_load(path.read_text()), tmp_path)
    assert outcome.status != "failed", f"{outcome.check}: {outcome.error}"
    expected = "refused" if "Expected: refused" in path.read_text() else "passed"
    assert outcome.status == expected, outcome.error


def test_a_forget_fraction_of_one_keeps_nothing(tmp_path):
    """weight_decay with a forget input at alpha = 1 (its documented range's end): the chunked form stays finite
    and equals the token loop, which forgets the whole memory before the step."""
    document = yaml.safe_load((Path(__file__).parent / "fuzz_regressions" / "weight_decay_forget.yaml").read_text())
    outcome = check_document(document, tmp_path)  # generates and imports the package
    assert outcome.status == "passed", outcome.error
    module = _import_package(tmp_path / "out" / document["name"])
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 20, 2, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    a = torch.ones(1, 20, 2, dtype=torch.float64)
    a[:, ::3] = 0.3
    beta = torch.rand(1, 20, 2, generator=generator, dtype=torch.float64)
    o_chunk, _ = module.chunk_forgetful_delta(q, k, v, a, beta, chunk_size=16)
    o_naive, _ = module.naive_forgetful_delta(q, k, v, a, beta)
    assert torch.isfinite(o_chunk).all()
    torch.testing.assert_close(o_chunk, o_naive)


def test_shrinking_moves_toward_simpler_specs():
    document = {"name": "x", "description": "d", "inputs": {"gate": {"shape": ["H"], "role": "log_decay"}},
                "regressor": "linear", "weights": {"decay": "gate"}, "optimiser": {"method": "exact", "ridge": 1.0}}
    candidates = list(_simpler(document))
    assert {"name": "x", "inputs": document["inputs"], "regressor": "linear", "weights": {"decay": "gate"},
            "optimiser": {"method": "exact", "ridge": 1.0}} in candidates  # the description dropped
    assert any(c.get("weights") == "uniform" and "inputs" not in c for c in candidates)  # the decay and its input
    renamed = _renamed(document, "gate", "x0")
    assert renamed["weights"] == {"decay": "x0"} and list(renamed["inputs"]) == ["x0"] and renamed["name"] == "x"


def test_every_drawn_linear_memory_gets_a_chunked_form(tmp_path):
    """No linear-memory spec falls back to the token loop: each of 80 drawn ones that compiles gets `chunk_<name>`,
    and the Triton chunked kernels with their derived backward but for the families `missing_fast_paths` excuses
    (the fuzzer's own rule, which every campaign applies)."""
    code = ("import json; from ttr_codegen.fuzz import draw_documents; "
            "print(json.dumps(draw_documents(80, seed=17, regressor='linear')))")
    documents = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                          check=True).stdout)
    compiled, missing, with_triton = 0, [], 0
    for index, document in enumerate(documents):
        path = tmp_path / f"spec{index}.yaml"
        path.write_text(yaml.safe_dump(document))
        try:
            result = compile_spec(path, tmp_path / "out")
        except SpecError:
            continue
        compiled += 1
        with_triton += any(f.relative_path == "chunk_triton.py" for f in result.files)
        lacks = missing_fast_paths(result)
        if lacks:
            missing.append(f"{lacks}:\n{yaml.safe_dump(document)}")
    assert compiled >= 50 and with_triton >= 40, (compiled, with_triton)
    assert not missing, "\n---\n".join(missing)


def test_layers_of_one_name_keep_their_own_custom_ops(tmp_path):
    """The catalogue's gated_delta_product and the regression fixture of the same name (another spec: its
    decay is spelled differently) both register Triton custom ops; importing the fixture's package must not
    replace the catalogue's ops (a registration under a taken name would, for every caller). The catalogue's
    training path still gives naive_gated_delta_product's gradients afterwards."""
    from generated.gated_delta_product import chunk as catalogue_chunk
    from generated.gated_delta_product import naive_gated_delta_product
    from generated.gated_delta_product.chunk_triton import chunk_op
    from generated.gated_delta_product.layer import GatedDeltaProduct
    from ttr_codegen.testing import LayerChecks

    fixture = Path(__file__).parent / "fuzz_regressions" / "gated_delta_product.yaml"
    document = yaml.safe_load(fixture.read_text())
    assert document["name"] == "gated_delta_product"
    compiled = compile_spec(fixture, tmp_path / "out")
    write_atomically(plan_changes(compiled.package_dir, compiled.files))
    other = _submodule(_import_package(compiled.package_dir), "chunk_triton")
    assert other.chunk_op is not chunk_op and other.chunk_op._name != chunk_op._name  # two ops, two names
    root = Path(__file__).resolve().parents[1]
    checks = LayerChecks(root / "specs" / "gated_delta_product.yaml", naive_gated_delta_product, GatedDeltaProduct)
    checks.triton_train_gradients(catalogue_chunk._triton_train, T=40, K=6, V=5)
