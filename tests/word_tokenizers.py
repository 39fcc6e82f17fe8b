"""Local word-level tokenizers for the tests (no download): whitespace split over a fixed list."""

from __future__ import annotations

import transformers

WORDS = ("the cat sat on a mat and dog ran far away over hill where is it who what Question: Answer: "
         "<|user|> <|assistant|> <|end|> red blue green one two three").split()
CHAT_TEMPLATE = ("{{ bos_token }} {% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(chat: bool) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS (whitespace split), BOS added to every encoding;
    with ``chat``, a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    fast.chat_template = CHAT_TEMPLATE if chat else None
    return fast


def numbered_tokenizer(vocab: int = 128) -> transformers.PreTrainedTokenizerFast:
    """A tokenizer whose token i is the word ``w<i>`` (the tiny test models' vocabulary), but
    for the last, ``abcdef`` (transformers' stop-string matching tokenizes that word)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab - 1)} | {"abcdef": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0")
