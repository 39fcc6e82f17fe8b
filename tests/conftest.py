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

# Seconds each file takes in a cold two-worker run: session 26's `pytest -n 2 --dist loadfile --durations=0`
# per file (scaled by 0.82 to the session-25 machine's speed), less what the changes made after it saved
# (test_generate, test_startup, test_cycles, test_regional, test_chunk), files above 10 s; test_loops.py (session 27)
# from its own run. `make test` hands whole
# files to the two workers in collection order (--no-loadscope-reorder): the longest first, so that no long file
# starts last and leaves one core idle (by xdist's default order, the number of tests a file holds, the one-test
# tests/test_kernel_aot.py (20 s) ran last while the other worker had been idle for 14 s).
FILE_SECONDS = {
    "test_generate.py": 47, "test_support.py": 47, "test_longctx.py": 41, "test_compile.py": 41,
    "test_precompiled.py": 36, "test_readme.py": 36, "test_masks.py": 28, "test_indexed.py": 22, "test_chunk.py": 22, "test_fp8.py": 21,
    "test_chunked_attention.py": 20, "test_eager_attention.py": 20, "test_flex_pass.py": 19,
    "test_pass_invariants.py": 18, "test_kernel_aot.py": 16, "test_latent.py": 16, "test_linear_pass.py": 12,
    "test_loops.py": 12, "test_cycles.py": 11, "test_startup.py": 10,
}


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    """Files in descending measured time (unlisted files after them, in their own order); the
    tests of a file keep theirs."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))
