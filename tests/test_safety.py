"""Generation is safe against hostile or mistaken input: spec text never becomes code, oversized or odd files
get one-line diagnostics, and the generator owns its package folders (stale files go, --check reports them)."""

import os
import time

from typer.testing import CliRunner

from ttr_codegen.cli import app
from ttr_codegen.fuzz import _import_package

runner = CliRunner()

DELTA = """\
name: {name}
description: {description}
inputs:
  beta: {{shape: [B, T, H], role: step_size}}
regressor: linear
optimiser: {{method: online_gradient_step, step_size: beta}}
"""


def generate(*args):
    return runner.invoke(app, ["generate", *map(str, args)], catch_exceptions=False)


def write_spec(directory, name="safe_delta", description="A delta rule."):
    path = directory / f"{name}.yaml"
    path.write_text(DELTA.format(name=name, description=description))
    return path


def test_hostile_description_stays_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hostile = """'x\"\"\" + __import__("pathlib").Path("PWNED").write_text("1") + \"\"\" \\'"""
    spec = write_spec(tmp_path, description=hostile)
    result = generate(spec, "--out", "layers")
    assert result.exit_code == 0, result.output
    module = _import_package(tmp_path / "layers" / "safe_delta")
    assert not (tmp_path / "PWNED").exists()
    assert '__import__("pathlib")' in module.__doc__  # the text, kept as text


def test_multi_line_description_is_refused(tmp_path):
    spec = write_spec(tmp_path, description='"one\\ntwo"')
    result = runner.invoke(app, ["generate", str(spec), "--out", str(tmp_path / "layers")])
    assert result.exit_code == 1 and "description: expected one line" in result.output


def test_alias_bomb_is_refused_quickly(tmp_path):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
              for i in range(1, 9)]
    spec = tmp_path / "bomb.yaml"
    spec.write_text("\n".join(lines) + "\nname: bomb\n")
    start = time.perf_counter()
    result = runner.invoke(app, ["generate", str(spec), "--out", str(tmp_path / "layers")])
    assert time.perf_counter() - start < 10
    assert result.exit_code == 1 and "more than 5000 YAML nodes" in result.output


def test_odd_files_get_one_line_diagnostics(tmp_path):
    cases = {
        "binary.yaml": (b"\x89PNG\r\n\x1a\n\xff\xfe\x00", "not UTF-8 text"),
        "tagged.yaml": (b"name: !!python/name:os.system x\n", "unsupported YAML tag"),
        "custom_tag.yaml": (b"name: !foo x\n", "unsupported YAML tag"),
        "long_name.yaml": (DELTA.format(name="a" * 300, description="x").encode(), "is not a valid layer name"),
        "huge.yaml": (b"# " + b"x" * 100_000 + b"\n", "larger than 64 KiB"),
        "huge_chunk.yaml": ((DELTA.format(name="c", description="x") + "schedule: {chunk_size: 1099511627776}\n").encode(),
                            "expected a power of two from 16 to 256"),
    }
    for name, (content, message) in cases.items():
        spec = tmp_path / name
        spec.write_bytes(content)
        result = runner.invoke(app, ["generate", str(spec), "--out", str(tmp_path / "layers")])
        assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit), name
        assert message in result.output and "Traceback" not in result.output, (name, result.output)


def test_out_naming_a_file_is_an_error(tmp_path):
    spec = write_spec(tmp_path)
    (tmp_path / "afile").write_text("")
    result = runner.invoke(app, ["generate", str(spec), "--out", str(tmp_path / "afile")])
    assert result.exit_code == 1 and "is a file, not a folder" in result.output


def test_the_generator_owns_its_packages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = write_spec(tmp_path)
    assert generate(first, "--out", "layers").exit_code == 0
    package = tmp_path / "layers" / "safe_delta"
    # Stale files (a module no longer generated, a leftover of an interrupted run) are extras for --check ...
    stale = package / "flash.py"
    stale.write_text((package / "naive.py").read_text())
    leftover = package / ".naive.py.abc.tmp"
    leftover.write_text("partial")
    check = runner.invoke(app, ["generate", str(first), "--out", "layers", "--check"])
    assert check.exit_code == 1 and "extra: layers/safe_delta/flash.py" in check.output and ".tmp" in check.output
    # ... and generate removes them.
    assert generate(first, "--out", "layers").exit_code == 0
    assert not stale.exists() and not leftover.exists()
    assert runner.invoke(app, ["generate", str(first), "--out", "layers", "--check"]).exit_code == 0
    # Another spec with the same layer name does not silently take the package over.
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    second = write_spec(other_dir, description="Someone else's layer.")
    refused = runner.invoke(app, ["generate", str(second), "--out", "layers"])
    assert refused.exit_code == 1 and "was generated from safe_delta.yaml" in refused.output
    assert runner.invoke(app, ["generate", str(second), "--out", "layers", "--force"]).exit_code == 0
    # Two specs of one name in one run: nothing written.
    both = runner.invoke(app, ["generate", str(first), str(second), "--out", "fresh"])
    assert both.exit_code == 1 and "several specs are named safe_delta" in both.output
    assert not (tmp_path / "fresh").exists()


def test_generated_files_follow_the_umask(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path)
    old = os.umask(0o022)
    try:
        assert generate(spec, "--out", "layers").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "layers" / "safe_delta" / "naive.py").stat().st_mode & 0o777 == 0o644


def test_an_input_a_closure_reads_is_not_rebound_after_it(tmp_path):
    """The name-clash probe lets generated code rebind a variable named like an input once the input is read for
    the last time (`beta = beta / ...`). A nested function reads its names whenever it is called: its reads count
    as the enclosing definition's last line, so rebinding such a name after the closure's definition is a clash
    (a context-parallel module rebound `decay` after a closure that passes the input `decay` on)."""
    from ttr_codegen.pipeline import name_clashes
    from ttr_codegen.render.files import RenderedFile
    from ttr_codegen.spec import load_spec

    spec = load_spec(write_spec(tmp_path))  # one input, beta: its probe name is zq0input
    rebound_after_last_read = RenderedFile("a.py", "def f(zq0input):\n    beta = zq0input * 2\n    return beta\n")
    rebound_after_closure = RenderedFile("b.py", "def f(zq0input):\n    def run():\n        return zq0input + 1\n"
                                                 "    beta = run()\n    return run() + beta\n")
    assert name_clashes(spec, [rebound_after_last_read]) == []
    [clash] = name_clashes(spec, [rebound_after_closure])
    assert "the name 'beta' clashes with 'beta'" in clash.message
