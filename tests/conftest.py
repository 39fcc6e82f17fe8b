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

# Tests compile many fresh models in one process; all HF forwards share one transformers wrapper
# code object, so dynamo's per-code recompile limit is raised for the whole session: module-scoped
# fixtures compile too (a per-test patch left them at moa-flex's own 64, which a worker that had
# compiled many models before tests/test_regional.py's fixture once exceeded).
torch._dynamo.config.recompile_limit = 256
torch._dynamo.config.accumulated_recompile_limit = 4096
