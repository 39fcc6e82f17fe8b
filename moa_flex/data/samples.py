"""Calibration samples as tokens, and the text sources that make them.

A :class:`Sample` is four token sequences (1-D int64, CPU), in order:

    head      prompt tokens before the context (BOS, chat template header)
    context   the long document; the only part ever trimmed
    question  everything after the context up to the answer (question, template, "Answer:")
    answer    the dense model's own greedy answer (MoA's model alignment); empty until answered

Text source: a JSONL file (:func:`load_jsonl`; one object per line, ``{"context": str,
"question": str}``, other fields ignored), formatted with the tokenizer's chat template when
it has one and the plain ``"{context}\\n\\nQuestion: {question}\\nAnswer:"`` otherwise. A sample
is brought to a length by trimming the middle of its context (its start and end are kept);
samples are never padded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

CONTEXT_MARK = "\u2063MOA_FLEX_CONTEXT\u2063"  # placeholder split out of the rendered chat template
PLAIN_QUESTION = "\n\nQuestion: {question}\nAnswer:"


def _ids(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.long).reshape(-1) if not isinstance(x, torch.Tensor) else x
    if t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"Sample.{name} must be a 1-D integer token sequence, got {t.dtype} of shape {tuple(t.shape)}")
    return t.to("cpu", torch.long)


@dataclass(frozen=True, eq=False)
class Sample:
    """One calibration sample as tokens (see the module docstring for the four parts)."""

    head: torch.Tensor
    context: torch.Tensor
    question: torch.Tensor
    answer: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def __post_init__(self) -> None:
        for name in ("head", "context", "question", "answer"):
            object.__setattr__(self, name, _ids(getattr(self, name), name))

    @property
    def prompt_ids(self) -> torch.Tensor:
        """head + context + question (tokens)."""
        return torch.cat([self.head, self.context, self.question])

    @property
    def input_ids(self) -> torch.Tensor:
        """The whole sample: prompt + answer (tokens)."""
        return torch.cat([self.prompt_ids, self.answer])

    @property
    def prompt_len(self) -> int:
        """Prompt length in tokens."""
        return self.head.numel() + self.context.numel() + self.question.numel()

    @property
    def num_tokens(self) -> int:
        """Prompt + answer length in tokens."""
        return self.prompt_len + self.answer.numel()

    def trimmed(self, prompt_len: int) -> "Sample":
        """The sample with its prompt brought to ``prompt_len`` tokens by removing the middle of the
        context (first ceil(keep/2) and last floor(keep/2) context tokens kept). Drops the answer,
        which belonged to the untrimmed prompt. ValueError if the prompt is shorter, or if the
        head and question alone exceed ``prompt_len``."""
        fixed = self.head.numel() + self.question.numel()
        if prompt_len > self.prompt_len:
            raise ValueError(f"cannot trim a prompt of {self.prompt_len} tokens to a longer {prompt_len}; samples are never padded")
        if prompt_len < fixed:
            raise ValueError(f"prompt_len {prompt_len} is shorter than the sample's head + question ({fixed} tokens)")
        keep = prompt_len - fixed
        front = (keep + 1) // 2
        back = keep - front
        ctx = torch.cat([self.context[:front], self.context[self.context.numel() - back:]])
        return Sample(self.head, ctx, self.question)

    def with_answer(self, answer: torch.Tensor | Sequence[int]) -> "Sample":
        """The same prompt with the given answer tokens."""
        return replace(self, answer=_ids(answer, "answer"))


# --------------------------------------------------------------------------------------------
# Text sources


def format_sample(tokenizer: Any, context: str, question: str) -> Sample:
    """Tokenize (context, question): with the tokenizer's chat template when it has one (one user
    turn holding context and question, then the generation prompt), plain otherwise
    (tokenizer's special tokens + context + ``PLAIN_QUESTION``). Parts are tokenized apart, so
    the context can be trimmed by tokens."""
    if not isinstance(context, str) or not isinstance(question, str):
        raise TypeError("context and question must be strings")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{CONTEXT_MARK}\n\n{question}"}], tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str) or text.count(CONTEXT_MARK) != 1:
            raise ValueError("the tokenizer's chat template must render the user message verbatim exactly once")
        head_text, tail_text = text.split(CONTEXT_MARK)
        head = tokenizer(head_text, add_special_tokens=False)["input_ids"]
        question_ids = tokenizer(tail_text, add_special_tokens=False)["input_ids"]
    else:
        head = tokenizer("", add_special_tokens=True)["input_ids"]
        question_ids = tokenizer(PLAIN_QUESTION.format(question=question), add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return Sample(torch.tensor(head, dtype=torch.long), torch.tensor(context_ids, dtype=torch.long),
                  torch.tensor(question_ids, dtype=torch.long))


def load_jsonl(path: str | os.PathLike, tokenizer: Any) -> list[Sample]:
    """Samples from a JSONL file: one JSON object per line with string fields ``context`` and
    ``question`` (other fields ignored; blank lines skipped), formatted by :func:`format_sample`."""
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with 'context' and 'question', got {type(obj).__name__}")
            for name in ("context", "question"):
                if not isinstance(obj.get(name), str):
                    raise ValueError(f"{path}:{lineno}: field {name!r} must be a string, got {obj.get(name)!r:.40}")
            samples.append(format_sample(tokenizer, obj["context"], obj["question"]))
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples
