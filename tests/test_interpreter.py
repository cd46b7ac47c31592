"""The interpreter's shortcuts (ttr_codegen/interpreter.py): in place with the installed Triton, and the kernels
they run give the same answers, launch after launch, with Triton's language put back between launches."""

import os

import pytest
import torch
import triton
import triton.language as tl

from ttr_codegen import interpreter

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's own checks")


@triton.jit
def _offsets(row, C: tl.constexpr):
    """int32 index arithmetic in a helper (what the overflow checks and the repeated patching cost)."""
    return row * C + tl.arange(0, C)


@triton.jit
def _scaled(x, factor):
    return x * factor


@triton.jit
def _rows_kernel(x, y, factor, C: tl.constexpr):
    at = _offsets(tl.program_id(0), C)
    tl.store(y + at, _scaled(tl.load(x + at), factor) + tl.sum(tl.load(x + at)))


@triton.jit
def _refuses(C: tl.constexpr):
    tl.static_assert(C == 0, "refused")


@triton.jit
def _failing_kernel(x, C: tl.constexpr):
    at = _offsets(tl.program_id(0), C)
    _refuses(C)  # fails inside a helper, mid-launch
    tl.store(x + at, tl.load(x + at))


def test_both_shortcuts_are_in_place_with_the_installed_triton():
    # Without them the CPU suite takes about twice as long (CI's limit); a Triton that changed shape says so here.
    assert interpreter.skip_unused_overflow_checks(), f"Triton {triton.__version__}: overflow checks still on"
    assert interpreter.skip_repeated_patching(), f"Triton {triton.__version__}: helpers still patch the language"


def test_kernels_with_helpers_match_torch_launch_after_launch():
    x = torch.randn(5, 16, dtype=torch.float32)
    for factor in (2.0, -0.5):
        y = torch.empty_like(x)
        _rows_kernel[(5,)](x, y, factor, C=16)
        torch.testing.assert_close(y, x * factor + x.sum(dim=1, keepdim=True))


def test_the_language_is_put_back_after_each_launch_even_a_failing_one():
    builtin_sum = tl.sum
    x = torch.randn(2, 16)
    _rows_kernel[(2,)](x, torch.empty_like(x), 1.0, C=16)
    assert tl.sum is builtin_sum
    with pytest.raises(Exception):
        _failing_kernel[(2,)](x, C=16)
    assert tl.sum is builtin_sum
    y = torch.empty_like(x)
    _rows_kernel[(2,)](x, y, 3.0, C=16)  # and the next launch patches it again
    torch.testing.assert_close(y, 3.0 * x + x.sum(dim=1, keepdim=True))
