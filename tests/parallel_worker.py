"""One rank of tests/test_parallel.py (run by torchrun, gloo, 2 processes): a tiny Llama loaded
with transformers' tp_plan="auto" and the same model in one process, both compiled with the
same sparse plan; writes what each gives to OUT/rank<r>.json."""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
import transformers

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(__file__))

import moa_flex  # noqa: E402
from tiny_models import ids_of, sparse_plan  # noqa: E402


def main(folder: str, out: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    ids = ids_of(120, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    result = {}
    for granularity in ("kv_head", "head"):
        tp = transformers.AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", attn_implementation="sdpa").eval()
        one = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
        plan = sparse_plan(one.config, granularity, seed=6)
        for model in (tp, one):
            moa_flex.compile(model, plan, backend="eager", progress=False, prefill_chunk=48)
        with torch.no_grad():
            logits = [m(input_ids=ids, attention_mask=mask).logits for m in (tp, one)]
            seqs = [m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
                    for m in (tp, one)]
        result[granularity] = {
            "local_heads": [tp.moa_flex.plan.num_heads, tp.moa_flex.plan.num_kv_heads],
            "logits_diff": float((logits[0] - logits[1])[:, 9:].abs().max()),
            "tokens_equal": bool(torch.equal(seqs[0], seqs[1])),
            "cuts": float((logits[1] - one.moa_flex.original_forward(input_ids=ids, attention_mask=mask).logits)[0]
                          .abs().max()),
        }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
