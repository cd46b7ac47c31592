"""Test-session set-up shared by tests/ and generated/.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors; the switch must be set before
any kernel is defined, so it lives here, ahead of every test module's imports.
"""

import os

import torch

from ttr_codegen import interpreter

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    interpreter.speed_up()  # what it skips buys nothing: about half of a kernel test's time


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run: python -m pytest -m gpu tests/gpu)")
