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

# Longest files first. `make test` runs whole files on two workers (xdist --dist loadfile,
# --no-loadscope-reorder), handing out the next file to whichever worker is free; xdist's own
# order (most tests first) left files of few long tests (test_kernel_aot: one test, 34 s) to the
# end, one worker idle meanwhile. Seconds of test time per file on the CI machine (a cold run,
# 2026-12-06); a file not listed runs after these, in collection order.
FILE_SECONDS = {
    "test_compile.py": 97, "test_support.py": 93, "test_fp8.py": 62, "test_precompiled.py": 60,
    "test_regional.py": 58, "test_generate.py": 50, "test_longctx.py": 48, "test_readme.py": 46,
    "test_kernel_aot.py": 34, "test_masks.py": 33, "test_flex_pass.py": 32, "test_startup.py": 31,
    "test_chunked_attention.py": 29, "test_chunk.py": 28, "test_eager_attention.py": 27, "test_latent.py": 23,
    "test_multimodal.py": 22, "test_pass_invariants.py": 22, "test_api.py": 17, "test_linear_pass.py": 17,
    "test_verify.py": 14,
}


def pytest_collection_modifyitems(items: list) -> None:
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: within a file, as collected
