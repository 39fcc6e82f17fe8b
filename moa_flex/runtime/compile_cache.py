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

For a model on an x86 CPU the folder also keeps the result of inductor's vector-ISA probe (which
builds a test library per ISA and loads it in a subprocess: about 1.2 s of every process that
compiles C++), named by what the probe depends on (torch version, the CPU's ISA flags, the C++
compiler's path and modification time). The first process probes at ``compile`` and writes it;
later ones read it. When every ISA the CPU flags was usable, both set inductor's own switch
``cpp.vec_isa_ok`` (which then skips the probe), so that every process compiles under the same
inductor configuration, which is part of the compiled graphs' cache keys.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
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

    def __init__(self, key: str, folder: Path | None = None, cpu: bool = False) -> None:
        self.folder = (folder or cache_folder()) / key
        self.cpu = cpu  # a model on the CPU: settle inductor's vector-ISA probe (settle_isa_probe)
        self.loaded_bytes = 0
        self.saved_bytes = 0
        self._misses = _misses()
        _LIVE.add(self)

    def load(self) -> bool:
        """Put every file's artifacts into torch's local caches; False if there is none. A
        file torch cannot read (another torch's, or broken) is skipped and deleted. A CPU
        model's cache also settles the vector-ISA probe (:func:`settle_isa_probe`)."""
        if self.cpu:
            settle_isa_probe(self.folder.parent)
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
        write_atomically(path, data)
        self.saved_bytes += len(data)
        return len(data)


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in its folder (created if missing),
    so that a reader in another process sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _isa_probe_file(folder: Path) -> Path | None:
    """The file for this machine's vector-ISA probe (x86 only; None elsewhere, or if this
    torch's inductor has no such probe)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        from torch._inductor import config, cpu_vec_isa

        flags = sorted(cpu_vec_isa.x86_isa_checker())
    except (ImportError, AttributeError):
        return None
    cxx = config.cpp.cxx[-1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
    compiler = shutil.which(cxx or "g++")
    mtime = os.path.getmtime(compiler) if compiler else None
    what = json.dumps([torch.__version__, flags, compiler, mtime])
    return folder / f"cpu-isa-{hashlib.sha256(what.encode()).hexdigest()[:16]}.json"


def _flagged_isas() -> list[str]:
    """The ISAs inductor would probe: those whose flags the CPU reports."""
    from torch._inductor import cpu_vec_isa

    flags = cpu_vec_isa.x86_isa_checker()
    return [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]


def settle_isa_probe(folder: Path) -> bool:
    """Read this machine's probe record, or probe now and write it; if every ISA the CPU flags
    was usable, set ``torch._inductor.config.cpp.vec_isa_ok`` (when unset), which skips the
    probe. True when the record was read (no probe ran). Not x86, or an inductor without
    this probe: nothing."""
    path = _isa_probe_file(folder)
    if path is None:
        return False
    from torch._inductor import config, cpu_vec_isa

    if config.cpp.vec_isa_ok is not None:  # the user's own setting
        return False
    usable, reused = _read_isa_record(path), True
    if usable is None:
        usable, reused = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()], False
        write_atomically(path, json.dumps({"usable": usable}).encode())
    if usable == _flagged_isas():
        config.cpp.vec_isa_ok = True
    return reused


def _read_isa_record(path: Path) -> list[str] | None:
    try:
        usable = json.loads(path.read_text())["usable"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return usable if isinstance(usable, list) else None


_LIVE: weakref.WeakSet[CompileCache] = weakref.WeakSet()  # saved at exit


@atexit.register
def _save_at_exit() -> None:
    for cache in list(_LIVE):
        try:
            cache.save()
        except Exception:  # noqa: BLE001, S110 - exiting: a cache that cannot be written is only a slower next start
            pass
