"""Long-context tasks generated locally with fixed seeds (no hub): passkey in
filler text, LongEval-style "lines" retrieval, a needle in real English text, and
real English text for perplexity / fidelity. Every prompt is sized in tokens."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache

FILLER = ("The grass is green. The sky is blue. The sun is yellow. "
          "Here we go. There and back again. ")
ADJECTIVES = ["swift", "quiet", "amber", "hollow", "bright", "gentle", "rapid", "silver",
              "ancient", "frozen", "golden", "narrow", "scarlet", "velvet", "wild", "calm"]
NOUNS = ["moon", "river", "falcon", "meadow", "harbor", "lantern", "canyon", "orchid",
         "glacier", "compass", "thistle", "beacon", "willow", "ember", "summit", "reef"]


@dataclass(frozen=True)
class Sample:
    task: str
    length: int  # target prompt length in tokens
    depth: float  # where the answer sits, 0 = start, 1 = end
    prompt: str
    answer: str


@cache
def english_text() -> str:
    """Real English prose shipped with Python (the language reference topics)."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    return re.sub(r"\s+", " ", text)


def _fit(tokenizer, before: str, needle: str, after_filler: str, question: str,
         length: int, depth: float, filler: str) -> str:
    """Filler with the needle at ``depth``, trimmed to about ``length`` tokens."""
    overhead = len(tokenizer(needle + question)["input_ids"]) + 32
    ids = tokenizer(filler)["input_ids"]
    budget = max(0, length - overhead)
    ids = (ids * (budget // max(1, len(ids)) + 1))[:budget]
    cut = int(len(ids) * depth)
    head = tokenizer.decode(ids[:cut])
    tail = tokenizer.decode(ids[cut:])
    return f"{before}{head} {needle} {tail}{after_filler}"


def chat(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def passkey(tokenizer, length: int, depth: float, rng: random.Random) -> Sample:
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    question = "\nWhat is the pass key? Answer with the number only."
    body = _fit(tokenizer, "There is a pass key hidden in this text. Find it.\n", needle,
                "", question, length, depth, FILLER)
    return Sample("passkey", length, depth, chat(tokenizer, body + question), key)


def lines(tokenizer, length: int, depth: float, rng: random.Random) -> Sample:
    names = [f"{a}-{n}" for a in ADJECTIVES for n in NOUNS]
    rng.shuffle(names)
    per_line = len(tokenizer("line swift-moon: REGISTER_CONTENT is <12345>\n")["input_ids"])
    count = max(2, min(len(names), (length - 60) // per_line))
    values = [rng.randint(10000, 99999) for _ in range(count)]
    target = min(count - 1, int(depth * count))
    text = "".join(f"line {names[i]}: REGISTER_CONTENT is <{values[i]}>\n" for i in range(count))
    question = (f"\nWhat is the REGISTER_CONTENT in line {names[target]}? "
                "Answer with the number only.")
    prompt = "Below is a record of lines I want you to remember.\n" + text + question
    return Sample("lines", length, depth, chat(tokenizer, prompt), str(values[target]))


def needle(tokenizer, length: int, depth: float, rng: random.Random) -> Sample:
    colour = rng.choice(["crimson", "turquoise", "saffron", "indigo", "emerald", "ochre"])
    text = english_text()
    start = rng.randrange(0, len(text) // 2)
    sentence = f"The secret colour of the lighthouse is {colour}."
    question = "\nWhat is the secret colour of the lighthouse? Answer with one word."
    body = _fit(tokenizer, "", sentence, "", question, length, depth,
                text[start: start + 8 * length])
    return Sample("needle", length, depth, chat(tokenizer, body + question), colour)


TASKS = {"passkey": passkey, "lines": lines, "needle": needle}


def make_samples(tokenizer, tasks, lengths, depths, samples: int, seed: int = 0) -> list[Sample]:
    out = []
    for task in tasks:
        for length in lengths:
            for depth in depths:
                for s in range(samples):
                    rng = random.Random(f"{seed}-{task}-{length}-{depth}-{s}")
                    out.append(TASKS[task](tokenizer, length, depth, rng))
    return out


def english_token_windows(tokenizer, lengths, per_length: int) -> list[tuple[int, list[int]]]:
    """Token windows of real English text for perplexity and fidelity."""
    ids = tokenizer(english_text())["input_ids"]
    windows = []
    for length in lengths:
        stride = max(1, (len(ids) - length) // per_length)
        windows += [(length, ids[i * stride: i * stride + length]) for i in range(per_length)]
    return windows


def is_correct(sample: Sample, text: str) -> bool:
    return sample.answer.lower() in text.lower()
