"""Every shim for a difference between supported transformers versions, in one place.

Supported: transformers 5.x from 5.17 (the GPU image) to the newest on PyPI. What differs:

* 5.24 renames the forward's and ``generate``'s cache argument from ``past_key_values`` to
  ``cache`` (the old name stays as a deprecated alias), and the ``cache`` field of
  ``GenerateDecoderOnlyOutput`` likewise: :func:`cache_argument`, :func:`generate_output`.
* Before 5.24 the packed-sequence mask_mod of flex_attention reads sequence ids only; from
  5.24 on it reads positions too. Both forms are proven by evaluation in
  :mod:`moa_flex.passes.flex_pass` (its ``packed`` semantics), not by version.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable


def cache_argument(forward: Callable) -> str:
    """The name under which a transformers forward takes its ``Cache``: ``cache`` from
    transformers 5.24 on (``past_key_values`` is its deprecated alias there), before that
    ``past_key_values``."""
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def takes_cache(forward: Callable) -> bool:
    """Whether a transformers forward takes a KV cache at all (under either name); OpenAI GPT's
    does not."""
    params = inspect.signature(forward).parameters
    return "cache" in params or "past_key_values" in params


def generate_output(cache: Any, **fields: Any) -> Any:
    """transformers' ``GenerateDecoderOnlyOutput``; its cache field is ``cache`` from 5.24 on,
    ``past_key_values`` before."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    names = {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)}
    return GenerateDecoderOnlyOutput(**fields, **{"cache" if "cache" in names else "past_key_values": cache})
