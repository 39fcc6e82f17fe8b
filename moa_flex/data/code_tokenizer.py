"""A byte-level BPE tokenizer for source code, trained with the ``tokenizers`` library.

Vocabulary (token ids)::

    0 <|bos|>   1 <|eos|>   2 <|pad|>                    (3 special tokens)
    [3, 259)    the 256 byte symbols of the ByteLevel alphabet
    [259, vocab_size)  learned merges                  (fewer if the texts run out of pairs)

Rules
    * no normaliser, ByteLevel pre-tokeniser (GPT-2 split regex, no prefix space) and ByteLevel
      decoder, so every string round-trips exactly: ``decode(encode(x)) == x``, whitespace,
      tabs, CRLF and any Unicode included;
    * ``encode`` adds no special tokens (no post-processor): the training code puts
      ``bos_token_id``/``eos_token_id`` around documents itself. A literal ``<|eos|>`` in a text
      is still read as the special token (it decodes back to the same string);
    * training is deterministic: the same texts (same order) and arguments give the same
      vocabulary and merges; ``sample_bytes`` draws whole documents with ``random.Random(seed)``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2


def sample_documents(texts: Sequence[str], max_bytes: int, *, seed: int = 0) -> list[str]:
    """Whole documents in a seeded random order, kept while their UTF-8 total stays within
    ``max_bytes`` bytes (a document that would overflow is skipped, later smaller ones still fit)."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    out: list[str] = []
    total = 0
    for i in order:
        size = len(texts[i].encode("utf-8"))
        if total + size <= max_bytes:
            out.append(texts[i])
            total += size
    return out


def _batches(texts: Iterable[str], size: int = 256) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    *,
    min_frequency: int = 2,
    sample_bytes: int | None = None,
    seed: int = 0,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of ``vocab_size`` tokens (specials and 256 bytes included) on ``texts``.

    ``min_frequency``: a pair merges only if it occurs at least this many times.
    ``sample_bytes``: train on :func:`sample_documents` of at most this many UTF-8 bytes (seeded
    by ``seed``) instead of all texts. Save with ``save_pretrained(folder)``; load with
    ``AutoTokenizer.from_pretrained(folder)``.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size {vocab_size} < {len(SPECIAL_TOKENS) + 256} (specials + bytes)")
    if sample_bytes is not None:
        texts = sample_documents(list(texts), sample_bytes, seed=seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_batches(texts), trainer=trainer)
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """A ``tokenizers`` tokenizer as a transformers fast tokenizer with bos/eos/pad set."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
    )


def bytes_per_token(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str]) -> float:
    """Compression: total UTF-8 bytes of ``texts`` over their total token count (no specials)."""
    n_bytes = n_tokens = 0
    for batch in _batches(texts):
        n_bytes += sum(len(t.encode("utf-8")) for t in batch)
        n_tokens += sum(len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
    return n_bytes / max(n_tokens, 1)
