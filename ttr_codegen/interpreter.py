"""Triton's interpreter (TRITON_INTERPRET=1: the kernels on the CPU), without two costs that buy nothing.

`speed_up` (about half of a kernel test's time) does both:

Integer overflow checks. Every int32 `+`, `-` and `*` of a kernel (its index arithmetic) is also done in int64
and compared with int32's range, for a `device_assert` that does nothing unless the launch is in debug mode,
which the interpreter's launches never are: `skip_unused_overflow_checks` turns the check off where its
assertion is off (what a GPU compilation leaves of it too).

Repeated patching. A kernel launch in the interpreter swaps triton.language's builtins for interpreted ones,
and puts them back when the launch ends. Every call of a `@triton.jit` helper inside the kernel swaps them
again, although they are already swapped: a scan of the language's modules that costs about 150 µs, which for
the generated kernels (small helpers, called per chunk and per solver step) is a sixth of a test's time.
`skip_repeated_patching` makes a helper's call skip that scan when the launch in progress has already swapped
every language module the helper sees; anything else (a launch, the first call of a helper that sees a module
the kernel did not, such as tl.sum) patches as before.

Both touch Triton's private interpreter state, and change nothing where that is missing or shaped otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect


def speed_up() -> None:
    """Both shortcuts (each where Triton's interpreter has the shape it expects)."""
    skip_unused_overflow_checks()
    skip_repeated_patching()


def _interpreter():
    """Triton's interpreter module, or None where Triton is missing."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return None
    return interpreter


def skip_unused_overflow_checks() -> bool:
    """Turn off the integer overflow checks whose assertion is off (not in debug mode); whether they are off."""
    interpreter = _interpreter()
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if not dataclasses.is_dataclass(options) or getattr(options, "debug", True) is not False:
        return False
    if getattr(options, "sanitize_overflow", None) is True:
        builder.options = dataclasses.replace(options, sanitize_overflow=False)
    return builder.options.sanitize_overflow is False


def skip_repeated_patching() -> bool:
    """Install the shortcut in Triton's interpreter (once); whether it is in place."""
    interpreter = _interpreter()
    patch = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if patch is None or scope_type is None or len(inspect.signature(patch).parameters) != 1:
        return False
    if getattr(patch, "skips_repeats", False):
        return True
    languages = (interpreter.tl, interpreter.tl.core)
    patched: list[set[int]] = []  # the modules the launch in progress swapped (empty: no launch)

    seen_by: dict = {}

    def seen(fn) -> set[int]:
        """The language modules fn's globals hold (looked up once per function: a module's imports stay)."""
        if fn not in seen_by:
            seen_by[fn] = {id(value) for value in fn.__globals__.values()
                           if any(value is language for language in languages)}
        return seen_by[fn]

    @functools.wraps(patch)
    def patch_once(fn):
        modules = seen(fn)
        if patched and modules <= patched[-1]:
            return scope_type()  # a helper inside the launch: nothing to swap, nothing to put back
        scope = patch(fn)
        if patched:
            # A helper that sees more than its kernel (tl.sum sees tl.core) is patched as Triton does; Triton never
            # restores a helper's scope, so those modules stay patched until the launch ends: its later helpers
            # that see them skip the scan too.
            patched[-1] = patched[-1] | modules
            return scope
        patched.append(modules)
        restore = scope.restore

        def restore_and_end():  # the launch's own scope: its end is when helpers patch again
            patched.clear()
            restore()

        scope.restore = restore_and_end
        return scope

    patch_once.skips_repeats = True
    interpreter._patch_lang = patch_once
    return True
