"""Generated code reads like hand-written code: lines of at most 120 characters, code wrapped inside its
brackets or at a sum's signs (`ttr_codegen/render/wrap.py`) without changing what it means, prose (docstrings,
comments) at its spaces; no name imported or assigned and never read (`ttr_codegen/render/hygiene.py`)."""

import ast
from pathlib import Path

import pytest

from ttr_codegen.render.hygiene import unused_imports, unused_locals
from ttr_codegen.render.wrap import long_code_lines, long_lines, wrap_long_lines, wrap_long_prose

ROOT = Path(__file__).resolve().parents[1]
GENERATED = sorted((ROOT / "generated").glob("*/*.py"))


@pytest.mark.parametrize("path", GENERATED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_catalogue_lines_fit(path):
    text = path.read_text()
    assert long_lines(text) == [], f"{path.name}: lines over 120 characters"


@pytest.mark.parametrize("path", [p for p in GENERATED if p.name != "__init__.py"],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_catalogue_imports_only_what_it_reads(path):
    """No generated module imports a name it never reads (a package's __init__ re-exports: not asked)."""
    assert unused_imports(path.read_text()) == [], f"{path.parent.name}/{path.name}: unused imports"


def test_unused_imports_are_found():
    text = ("from __future__ import annotations\nimport torch\nimport torch.nn.functional as F\n"
            "from .a import b, c\nx = torch.ones(1) + c\n")
    assert unused_imports(text) == ["F (line 3)", "b (line 4)"]


@pytest.mark.parametrize("path", GENERATED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_catalogue_reads_what_it_computes(path):
    """No generated function assigns a value that nothing in it reads."""
    assert unused_locals(path.read_text()) == [], f"{path.parent.name}/{path.name}: values never read"


def test_unused_locals_are_found():
    text = ("def f(x):\n    a = x + 1\n    b = 2\n    c = 0\n    c += a\n    _ = 3\n    def g():\n"
            "        return x\n    return g\n")
    assert unused_locals(text) == ["f: b (line 3)"]


@pytest.mark.parametrize("path", GENERATED[::3], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_rewrapping_narrower_keeps_the_code(path):
    """Wrapping real generated code again at 60 characters: the same syntax tree, and far fewer long lines."""
    text = path.read_text()
    narrow = wrap_long_lines(text, width=60)
    assert ast.dump(ast.parse(narrow)) == ast.dump(ast.parse(text))
    assert len(long_code_lines(narrow, 60)) < max(1, len(long_code_lines(text, 60))) or not long_code_lines(text, 60)


@pytest.mark.parametrize(("source", "expected"), [
    # Arguments aligned after the bracket.
    ("x = function(alpha, beta, gamma, delta)\n",
     "x = function(alpha, beta, gamma,\n             delta)\n"),
    # An import list gains brackets.
    ("from module import alpha, beta, gamma\n",
     "from module import (alpha, beta,\n                    gamma)\n"),
    # A sum's right side gains parentheses and breaks before a sign; a unary minus stays.
    ("total = alpha_value + -beta - gamma_value\n",
     "total = (alpha_value + -beta\n         - gamma_value)\n"),
    # Strings, comments and docstrings are left as they are.
    ('"""A docstring line longer than the width."""\n# a comment longer than the width\ns = "a string, with commas"\n',
     '"""A docstring line longer than the width."""\n# a comment longer than the width\ns = "a string, with commas"\n'),
])
def test_wrapping_examples(source, expected):
    assert wrap_long_lines(source, width=32) == expected
    assert ast.dump(ast.parse(source)) == ast.dump(ast.parse(expected))


def test_prose_wrapping():
    """A long docstring line breaks at its spaces (after a label, on a hanging indent), a comment alone on its
    line continues as a comment; code, and a string that is not a docstring, stay as they are."""
    source = ('def f():\n'
              '    """Returns the thing.\n\n'
              '    objective: alpha beta gamma delta epsilon\n'
              '    """\n'
              '    # one two three four five six\n'
              '    s = "a string that is long enough to pass"  # trailing\n'
              '    return s\n')
    expected = ('def f():\n'
                '    """Returns the thing.\n\n'
                '    objective: alpha beta\n'
                '        gamma delta epsilon\n'
                '    """\n'
                '    # one two three four\n'
                '    # five six\n'
                '    s = "a string that is long enough to pass"  # trailing\n'
                '    return s\n')
    assert wrap_long_prose(source, width=28) == expected
    assert ast.parse(expected)
