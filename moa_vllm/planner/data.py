"""Calibration data: long documents whose targets are the dense model's own answers.

The default source works offline: real English prose from the Python standard
library's own documentation (``pydoc_data.topics``, ~465k characters shipped with
every CPython), turned into synthetic long-range tasks:

* ``facts``: key-value retrieval. Two ``The access code of <w>-<w> is <n>.``
  sentences are scattered through the prose; the question asks for one code.
  The targets must be answers the dense model gets right, or the profile cannot
  see which heads retrieve: SmolLM2-135M fails LongEval-style lines (many 5-digit
  registers) at every length, but finds one of a few short codes.
* ``passages``: multi-passage summarisation. Several titled passages (one per
  documentation topic); the question asks to summarise one of them (not the last).
* ``topics``: whole-document question: list every topic with one sentence each.

Every prompt is built at the token level to an exact budget (``length`` minus the
answer tokens), wrapped in the tokenizer's chat template when it has one, and its
target is the dense model's greedy answer (``answer_tokens`` new tokens at most).

``--dataset FILE.jsonl`` replaces the synthetic source: ``{"prompt", "answer"}``
lines use the given answer as the target (its tokens, truncated); ``{"prompt"}`` or
``{"text"}`` lines get the dense model's answer (``{"text"}`` documents are asked to
be summarised). Prompts longer than the budget are cut in the middle (the head and
the tail, which usually holds the question, are kept).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

TASKS = ("facts", "passages", "topics")
FACTS_PER_PROMPT = 2
DOC = "\x00DOC\x00"


@dataclass
class Sample:
    task: str
    prompt: list[int]
    answer: list[int]

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "prompt": self.prompt, "answer": self.answer}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Sample:
        return Sample(d["task"], list(d["prompt"]), list(d["answer"]))

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.answer


def corpus_topics() -> dict[str, list[str]]:
    """Documentation topics -> paragraphs of English prose (>= 80 characters)."""
    from pydoc_data.topics import topics

    out = {}
    for name, text in sorted(topics.items()):
        paras = []
        for p in re.split(r"\n\s*\n", text):
            p = " ".join(p.split())
            if len(p) >= 80 and sum(c.isalpha() for c in p) > 0.6 * len(p):
                paras.append(p)
        if paras:
            out[name] = paras
    return out


def _words(topics: dict[str, list[str]]) -> list[str]:
    words = set()
    for paras in topics.values():
        for p in paras:
            words.update(w.lower() for w in re.findall(r"\b[a-zA-Z]{5,10}\b", p))
    return sorted(words)


class PromptBuilder:
    """Token-exact prompts: chat prefix + document tokens + question + generation prompt."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._tmpl: dict[str, tuple[list[int], list[int]]] = {}

    def enc(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def frame(self, question: str) -> tuple[list[int], list[int]]:
        if question not in self._tmpl:
            content = DOC + "\n\n" + question
            if getattr(self.tok, "chat_template", None):
                text = self.tok.apply_chat_template(
                    [{"role": "user", "content": content}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
            else:
                text = content + "\nAnswer:"
            head, tail = text.split(DOC)
            prefix = self.tok(head, add_special_tokens=True)["input_ids"] if head else []
            if not head and self.tok.bos_token_id is not None:
                prefix = [self.tok.bos_token_id]
            self._tmpl[question] = (prefix, self.enc(tail))
        return self._tmpl[question]


def _fill(segments: Iterable[list[int]], budget: int) -> list[int]:
    out: list[int] = []
    for s in segments:
        if len(out) >= budget:
            break
        out.extend(s[: budget - len(out)])
    return out


def synthetic_prompt(
    builder: PromptBuilder,
    topics: dict[str, list[str]],
    words: list[str],
    task: str,
    budget: int,
    rng: random.Random,
) -> list[int]:
    """One prompt of exactly ``budget`` tokens (when the corpus allows)."""
    names = list(topics)
    enc = builder.enc
    if task == "facts":
        keys: list[str] = []
        while len(keys) < FACTS_PER_PROMPT:
            k = f"{rng.choice(words)}-{rng.choice(words)}"
            if k not in keys:
                keys.append(k)
        codes = [rng.randrange(100, 1000) for _ in keys]
        asked = rng.randrange(len(keys))
        question = f"What is the access code of {keys[asked]}? Answer with the code only."
        prefix, suffix = builder.frame(question)
        facts = [enc(f"The access code of {k} is {c}.\n\n") for k, c in zip(keys, codes)]
        prose_budget = budget - len(prefix) - len(suffix) - sum(map(len, facts))
        start = rng.randrange(len(names))
        paras = (enc(p + "\n\n") for name in names[start:] + names[:start] for p in topics[name])
        body = _fill(paras, max(0, prose_budget))
        cuts = sorted(rng.randrange(len(body) + 1) for _ in facts)
        parts, prev = [], 0
        for cut, fact in zip(cuts, facts):
            parts += [body[prev:cut], fact]
            prev = cut
        parts.append(body[prev:])
        return prefix + _fill(parts, budget - len(prefix) - len(suffix)) + suffix
    if task == "passages":
        order = rng.sample(names, len(names))
        cap = max(64, budget // 4)
        passages, titles, total = [], [], 0
        for name in order:
            text = " ".join(topics[name])
            ids = enc(f"Passage {len(passages) + 1} (about `{name}`):\n")
            ids += enc(text)[:cap] + enc("\n\n")
            passages.append(ids)
            titles.append(name)
            total += len(ids)
            if total >= budget:
                break
        asked = rng.randrange(max(1, len(passages) - 1))
        question = (
            f"Summarise passage {asked + 1} (about `{titles[asked]}`) in two sentences."
        )
        prefix, suffix = builder.frame(question)
        return prefix + _fill(passages, budget - len(prefix) - len(suffix)) + suffix
    if task == "topics":
        question = (
            "List every topic the document above covers, in order, "
            "with one sentence about each."
        )
        prefix, suffix = builder.frame(question)
        order = rng.sample(names, len(names))
        parts = [enc(" ".join(topics[n][:3]) + "\n\n") for n in order]
        return prefix + _fill(parts, budget - len(prefix) - len(suffix)) + suffix
    raise ValueError(f"unknown task {task}")


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not ({"prompt", "text"} & set(row)):
            raise ValueError(f"{path}:{i + 1}: each line needs a 'prompt' or a 'text'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no samples")
    return rows


def _cut_middle(ids: list[int], budget: int) -> list[int]:
    if len(ids) <= budget:
        return ids
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head):]


def user_prompt(builder: PromptBuilder, row: dict[str, Any], budget: int) -> list[int]:
    if "prompt" in row:
        prefix, suffix = builder.frame("")
        body = builder.enc(row["prompt"])
    else:
        prefix, suffix = builder.frame("Summarise the document above.")
        body = builder.enc(row["text"])
    return prefix + _cut_middle(body, budget - len(prefix) - len(suffix)) + suffix


def build_samples(
    model,
    tokenizer,
    length: int,
    num_samples: int,
    answer_tokens: int,
    seed: int,
    dataset: str | None = None,
    progress: bool = True,
) -> list[Sample]:
    """``num_samples`` samples of at most ``length`` tokens with dense-model answers."""
    from tqdm import tqdm

    from moa_vllm.planner.profile import masked_generate

    rng = random.Random(f"{seed}-{length}")
    builder = PromptBuilder(tokenizer)
    budget = length - answer_tokens
    if dataset is None:
        topics = corpus_topics()
        words = _words(topics)
        rows = [None] * num_samples
    else:
        all_rows = load_jsonl(dataset)
        rows = [all_rows[(rng.randrange(len(all_rows)) + i) % len(all_rows)] for i in range(num_samples)]
    samples = []
    eos = tokenizer.eos_token_id
    for i in tqdm(range(num_samples), desc=f"calibration {length}", disable=not progress, leave=False):
        row = rows[i]
        if row is None:
            task = TASKS[i % len(TASKS)]
            prompt = synthetic_prompt(builder, topics, words, task, budget, rng)
        else:
            task = "dataset"
            prompt = user_prompt(builder, row, budget)
        if row is not None and "answer" in row and "prompt" in row:
            answer = builder.enc(row["answer"])[:answer_tokens]
        else:
            answer = masked_generate(model, tokenizer, None, prompt, answer_tokens)
        if eos is not None and eos in answer:
            answer = answer[: answer.index(eos) + 1]
        if not answer:
            answer = builder.enc(" ")[:1]
        samples.append(Sample(task, prompt, answer))
    return samples
