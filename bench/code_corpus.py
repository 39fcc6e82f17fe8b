"""The code model's data on this machine: corpus, tokenizer and token stream sizes and times (CPU).

    python bench/code_corpus.py [--vocab-size 4096] [--sample-bytes 32000000] [--tokenize] [--record]

Builds the training corpus from this interpreter's site-packages (standard-library copies
excluded), trains the byte-level BPE tokenizer on a seeded sample, and measures its
compression on the held-out standard library; ``--tokenize`` also encodes the whole corpus
(what ``python -m moa_flex.zoo.train_code`` does before training). Prints a table;
``--record`` appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

from harness import record

from moa_flex.data.code_corpus import build_corpus, file_hashes, heldout_files, training_files
from moa_flex.data.code_tokenizer import bytes_per_token, sample_documents, train_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--sample-bytes", type=int, default=32_000_000, help="tokenizer training sample (bytes)")
    ap.add_argument("--tokenize", action="store_true", help="also encode the whole corpus")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    rows = []
    t = time.perf_counter()
    corpus = build_corpus(training_files(), exclude_sha256=file_hashes(heldout_files()), progress=False)
    m = corpus.manifest()
    rows.append(("corpus", f"{m['files']} files, {m['bytes'] / 2**20:.1f} MiB, {len(m['packages'])} packages; dropped "
                 + ", ".join(f"{k} {v}" for k, v in m["dropped"].items() if v), time.perf_counter() - t))
    docs = list(corpus.documents())
    t = time.perf_counter()
    tok = train_tokenizer(sample_documents(docs, args.sample_bytes, seed=0), vocab_size=args.vocab_size)
    rows.append(("tokenizer", f"vocabulary {len(tok)}, trained on {args.sample_bytes / 1e6:.0f} MB", time.perf_counter() - t))
    held = [p.read_text(encoding="utf-8") for p in heldout_files()]
    t = time.perf_counter()
    rows.append(("held-out", f"{len(held)} standard-library files, {bytes_per_token(tok, held):.3f} bytes/token",
                 time.perf_counter() - t))
    if args.tokenize:
        t = time.perf_counter()
        n = sum(len(ids) for ids in tok(docs, add_special_tokens=False)["input_ids"])
        rows.append(("token stream", f"{n / 1e6:.1f}M tokens, {m['bytes'] / n:.3f} bytes/token", time.perf_counter() - t))
    table = "| stage | result | seconds |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {s:.1f} |" for a, b, s in rows)
    print(table)
    if args.record:
        record("Code-model data: corpus, tokenizer, token stream", table, device="cpu",
               details=f"corpus sha256 {m['sha256'][:16]}")


if __name__ == "__main__":
    main()
