"""moa-flex's persistent compile cache: a second process starts from compiled code.

torch.compile keeps inductor's compiled graphs, AOTAutograd's results, Triton kernels and
autotuning results in local caches (``/tmp/torchinductor_<user>`` by default: lost with the
machine's temporary files, and never carried to another machine). moa-flex also keeps
them, as torch's portable cache artifacts (``torch.compiler.save_cache_artifacts``), in its
own folder: ``$MOA_FLEX_CACHE_DIR``, or ``~/.cache/moa-flex``, one sub-folder per key of
what the compiled code depends on: the model's config (its shape and type; not its name),
the plan's layout (granularity, sink; not its spans, which are data), dtype, device kind and
name, the compile options, and the versions of Python, torch, triton, transformers and
moa-flex. ``moa_flex.compile`` loads every file of its sub-folder; a process that compiled
something new (cache misses) adds one content-named file after ``warmup()`` and at exit.
Turn it off with ``moa_flex.compile(..., compile_cache=False)``. (docs/DESIGN.md, "Start-up")
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from moa_flex.plan import Plan

ENV = "MOA_FLEX_CACHE_DIR"
SWITCH = "MOA_FLEX_COMPILE_CACHE"  # "0": off unless compile(..., compile_cache=True)
SKIP_CONFIG_KEYS = ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash")


def cache_folder() -> Path:
    """Where the artifact files live: ``$MOA_FLEX_CACHE_DIR`` or ``~/.cache/moa-flex``."""
    folder = os.environ.get(ENV)
    if folder:
        return Path(folder)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moa-flex"


def cache_enabled(asked: bool | None) -> bool:
    """compile's ``compile_cache``: True / False as asked, None: on unless ``MOA_FLEX_COMPILE_CACHE=0``."""
    if asked is not None:
        if not isinstance(asked, bool):
            raise ValueError(f"compile_cache must be True, False or None, got {asked!r}")
        return asked
    return os.environ.get(SWITCH, "1") != "0"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{platform.machine()}"


def artifact_key(config: Any, plan: Plan, dtype: torch.dtype, device: torch.device, options: dict) -> str:
    """Hex digest naming one compiled setup (see the module docstring for what it covers)."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in SKIP_CONFIG_KEYS}
    what = {
        "config": cfg, "plan": [plan.granularity, plan.sink, plan.num_layers, plan.num_groups],
        "dtype": str(dtype), "device": _device_name(device), "options": options,
        "versions": [sys.version.split()[0], torch.__version__, _version("triton"), _version("transformers"),
                     _version("moa-flex")],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _misses() -> int:
    """Graphs this process compiled without a cache hit (inductor's and AOTAutograd's)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_miss"] + counters["aot_autograd"]["autograd_cache_miss"]


class CompileCache:
    """The artifact files of one compiled setup: a folder named by its key, holding one
    content-named file per save (a process writes only when it compiled something the files
    did not hold, and a process that used a part of them must not overwrite the rest)."""

    def __init__(self, key: str, folder: Path | None = None) -> None:
        self.folder = (folder or cache_folder()) / key
        self.loaded_bytes = 0
        self.saved_bytes = 0
        self._misses = _misses()
        _LIVE.add(self)

    def load(self) -> bool:
        """Put every file's artifacts into torch's local caches; False if there is none. A
        file torch cannot read (another torch's, or broken) is skipped and deleted."""
        for path in sorted(self.folder.glob("*.bin")):
            try:
                data = path.read_bytes()
                info = torch.compiler.load_cache_artifacts(data)  # None: torch could not read it
            except Exception:  # noqa: BLE001 - a stale file must not stop compile
                info = None
            if info is None:
                path.unlink(missing_ok=True)
                continue
            self.loaded_bytes += len(data)
        return self.loaded_bytes > 0

    def save(self) -> int:
        """After new compiles (cache misses): write the process's artifacts as one more file
        (atomically, named by content); bytes written (0: nothing new). Runs after
        ``warmup()`` and when the process exits."""
        misses = _misses()
        if misses == self._misses:
            return 0
        self._misses = misses
        found = torch.compiler.save_cache_artifacts()
        if not found:
            return 0
        data, _info = found
        path = self.folder / f"{hashlib.sha256(data).hexdigest()[:20]}.bin"
        if path.exists():
            return 0
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        self.saved_bytes += len(data)
        return len(data)


_LIVE: weakref.WeakSet[CompileCache] = weakref.WeakSet()  # saved at exit


@atexit.register
def _save_at_exit() -> None:
    for cache in list(_LIVE):
        try:
            cache.save()
        except Exception:  # noqa: BLE001, S110 - exiting: a cache that cannot be written is only a slower next start
            pass
