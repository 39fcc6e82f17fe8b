"""Stage 4, runtime: a plan running inside an HF model.

:mod:`.compile` (``moa_flex.compile``) puts the graph passes (:mod:`moa_flex.passes`) into
torch.compile; :mod:`.ops` registers every custom op the rewritten graphs call;
:mod:`.attention` runs FlexAttention with the plan's block masks; :mod:`.cache` is the ragged
MoA KV cache (slot map in :mod:`.slots`); :mod:`.forward` dispatches prefill and decode steps;
:mod:`.step_graph` replays captured decode steps; :mod:`.generate` and :mod:`.decode_loop`
serve ``model.generate``. This package's ``__init__`` imports nothing, so the passes can import
:mod:`.ops` without importing the compile API.
"""
