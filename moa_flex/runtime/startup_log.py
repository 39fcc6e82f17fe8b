"""Start-up lines on stderr: what moa-flex is compiling or capturing, and for how long.

A first request compiles graphs (Dynamo traces the model, inductor generates and compiles
code), FlexAttention kernels per key-length bucket, and captures a CUDA graph of the decode
step; on a large model that is minutes. :class:`StartupLog` prints one line when such a
phase starts and one when it ends, with its seconds (docs/DESIGN.md, "Start-up"). It is
silenced by ``moa_flex.compile(..., progress=False)`` (the CLI's ``--quiet``), or by the
environment variable ``MOA_FLEX_QUIET=1``. End lines of phases shorter than
:data:`QUIET_BELOW` seconds are left out.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterator

QUIET_BELOW = 1.0  # seconds: shorter phases print no end line


class StartupLog:
    """Phase lines for one compiled model. ``enabled`` False: silent."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and os.environ.get("MOA_FLEX_QUIET", "") in ("", "0")
        self.call_started = time.perf_counter()  # set before each compiled call: Dynamo's tracing starts there
        self.lines: list[str] = []  # everything said, also when silent (tests, warmup's summary)
        self.compiles = 0  # graphs and FlexAttention shapes compiled so far (warmup's "nothing left" check)

    def say(self, text: str) -> None:
        line = f"moa-flex: {text}"
        self.lines.append(line)
        if self.enabled:
            print(line, file=sys.stderr, flush=True)

    def calling(self) -> None:
        """A compiled callable is about to run (it may trace and compile)."""
        self.call_started = time.perf_counter()

    def traced(self, what: str, nodes: int) -> None:
        """Dynamo handed over the graph of ``what``: tracing took since :meth:`calling`."""
        self.say(f"{what}: traced {nodes} nodes in {time.perf_counter() - self.call_started:.1f} s (Dynamo); compiling")

    @contextlib.contextmanager
    def phase(self, what: str, announce: bool = True) -> Iterator[None]:
        """A start line (``announce``: "what ...") and an end line ("what in 2.0 s"; for an
        announced phase only when it took :data:`QUIET_BELOW` seconds or more)."""
        if announce:
            self.say(f"{what} ...")
        t0 = time.perf_counter()
        yield
        took = time.perf_counter() - t0
        if took >= QUIET_BELOW or not announce:
            self.say(f"{what} in {took:.1f} s")
