"""Test session set-up: run the Triton kernels in Triton's interpreter when there is no GPU.

triton 3.9 reads TRITON_INTERPRET when ``@triton.jit`` decorates a function, and its own
standard library (``tl.zeros``, ``tl.sum``, ``tl.max`` ...) is decorated when triton is first
imported; a kernel built as an ``InterpretedFunction`` by hand still fails on those. So the
variable must be set before anything imports triton, which is why it lives here (conftest is
imported before the test modules; ``import torch`` does not import triton). Only without
CUDA: on a GPU machine the kernels are compiled and tested on the device. Torch's inductor
reads the same variable only on its Triton (GPU) code paths; CPU compilation (C++), the
FlexAttention CPU tests included, is unaffected.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# moa-flex's persistent compile cache stays out of the suite's way (no files in ~/.cache);
# tests/test_startup.py turns it on where it is the subject
os.environ.setdefault("MOA_FLEX_COMPILE_CACHE", "0")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _many_compiles():  # noqa: ANN202
    """Tests compile many fresh models; all HF forwards share one transformers wrapper code
    object, so dynamo's per-code recompile limit (8) is raised for every test."""
    with torch._dynamo.config.patch(recompile_limit=256, accumulated_recompile_limit=4096):
        yield
