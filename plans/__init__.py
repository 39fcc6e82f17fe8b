"""Ready plan files shipped with moa-flex (package data ``moa_flex.plans``).

``names()`` lists them; ``load(name)`` returns a :class:`moa_flex.Plan`. The MoA authors'
published plans are converted by :mod:`moa_flex.plans.convert_upstream` (MIT, see
LICENSE-MoA in this folder).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from moa_flex.plan import Plan

_SUFFIX = ".json"


def _folder() -> Path:
    return Path(str(resources.files(__name__)))


def names() -> list[str]:
    """Names of the shipped plans, sorted (e.g. 'Llama-3-8B-Instruct-262k.moa')."""
    return sorted(p.name[: -len(_SUFFIX)] for p in _folder().glob("*" + _SUFFIX))


def path(name: str) -> Path:
    """File of a shipped plan; ValueError listing the known names if there is none."""
    p = _folder() / (name + _SUFFIX)
    if not p.is_file():
        raise ValueError(f"no shipped plan named {name!r}; known plans: {', '.join(names())}")
    return p


def load(name: str) -> Plan:
    """Load a shipped plan by name."""
    return Plan.load(path(name))
