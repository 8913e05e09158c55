"""Long-context tasks generated locally with fixed seeds (no hub), shared by
``moa-vllm eval`` and the plan search's validation: a passkey and a needle hidden
in one of three fillers (the classic repeated lines, varied everyday sentences,
real English prose) with one of several wordings; ``recall``, a fact in natural
text that the prompt's last words start to repeat (completion style: base models
solve it too); LongEval-style "lines" retrieval; and real English text for
perplexity / fidelity. Every prompt is sized in tokens; samples rotate over
fillers and wordings, so no figure rests on one kind of text."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache

REPEATED = ("The grass is green. The sky is blue. The sun is yellow. "
            "Here we go. There and back again. ")
EVERYDAY = [
    "The bakery on the corner opens at six every morning.",
    "A light rain fell over the hills during the night.",
    "Most of the visitors arrived by train from the coast.",
    "She painted the fence white and left the gate blue.",
    "The committee postponed its decision until next spring.",
    "Fresh bread was stacked on wooden shelves behind the counter.",
    "The old bridge was repaired with stone from the same quarry.",
    "Children played football in the square until it got dark.",
    "He wrote letters to his cousin every other week.",
    "The museum added a new wing for maps and instruments.",
    "A flock of geese crossed the lake in a long line.",
    "The library stays open late on Thursdays.",
    "Tomatoes ripened slowly in the cool summer that year.",
    "The ferry schedule changes when the winter storms begin.",
    "Her grandfather kept bees behind the orchard.",
    "The town council voted to plant trees along the river.",
    "A quiet hum came from the machines in the basement.",
    "The recipe calls for two eggs and a cup of flour.",
    "Snow closed the mountain pass for three days.",
    "The students compared their notes after the lecture.",
    "An old clock in the hallway chimed every quarter hour.",
    "The market sells cheese, honey and dried fruit on Saturdays.",
    "Fog rolled in from the sea before noon.",
    "The train slowed down as it approached the valley.",
]
FILLERS = ("repeated", "everyday", "prose")
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
    filler: str  # one of FILLERS (``lines``: its own register)


@cache
def english_text() -> str:
    """Real English prose shipped with Python (the language reference topics)."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    return re.sub(r"\s+", " ", text)


def filler_text(kind: str, length: int, rng: random.Random) -> str:
    """About ``length`` tokens' worth of one filler kind (``FILLERS``)."""
    if kind == "repeated":
        return REPEATED
    if kind == "everyday":
        sentences = []
        while len(sentences) * 12 < length:
            sentences += rng.sample(EVERYDAY, len(EVERYDAY))
        return " ".join(sentences)
    text = english_text()
    start = rng.randrange(0, len(text) // 2)
    return text[start: start + 8 * length]


def _fit(tokenizer, before: str, needle: str, question: str, length: int, depth: float,
         filler: str) -> str:
    """Filler with the needle at ``depth``, trimmed to about ``length`` tokens."""
    overhead = len(tokenizer(before + needle + question)["input_ids"]) + 32
    ids = tokenizer(filler)["input_ids"]
    budget = max(0, length - overhead)
    ids = (ids * (budget // max(1, len(ids)) + 1))[:budget]
    cut = int(len(ids) * depth)
    head = tokenizer.decode(ids[:cut])
    tail = tokenizer.decode(ids[cut:])
    return f"{before}{head} {needle} {tail}"


def chat(tokenizer, text: str, lead: str = "Answer:") -> str:
    """The prompt a model answers: a chat turn, or for a base model (no chat
    template) the text followed by ``lead``, which the answer completes."""
    if not getattr(tokenizer, "chat_template", None):
        return f"{text}\n{lead}"
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


# (intro, needle, question, completion lead for base models); {key} is the answer
PASSKEY_WORDINGS = [
    ("There is a pass key hidden in this text. Find it.\n",
     "The pass key is {key}. Remember it. {key} is the pass key.",
     "\nWhat is the pass key? Answer with the number only.", "The pass key is"),
    ("Read the text below carefully.\n",
     "Note for later: the access code is {key}.",
     "\nWhich access code was mentioned in the text? Reply with just the code.",
     "The access code is"),
    ("",
     "(The secret number you must remember is {key}.)",
     "\nWhat was the secret number? Give only the number.", "The secret number is"),
]
NEEDLE_WORDINGS = [
    ("", "The secret colour of the lighthouse is {key}.",
     "\nWhat is the secret colour of the lighthouse? Answer with one word.",
     "The secret colour of the lighthouse is"),
    ("A document follows.\n", "By the way, the painter's favourite colour was {key}.",
     "\nAccording to the document, what was the painter's favourite colour? One word.",
     "The painter's favourite colour was"),
    ("", "Remember this: the flag on the tower was {key}.",
     "\nWhat colour was the flag on the tower? Answer in one word.",
     "The flag on the tower was"),
]
COLOURS = ["crimson", "turquoise", "saffron", "indigo", "emerald", "ochre"]


def _hidden(task: str, wordings, key: str, tokenizer, length: int, depth: float,
            rng: random.Random, variant: int) -> Sample:
    """A ``key`` hidden at ``depth`` in the filler and wording of ``variant``."""
    kind = FILLERS[variant % len(FILLERS)]
    intro, needle_text, question, lead = wordings[(variant // len(FILLERS)) % len(wordings)]
    body = _fit(tokenizer, intro, needle_text.format(key=key), question, length, depth,
                filler_text(kind, length, rng))
    return Sample(task, length, depth, chat(tokenizer, body + question, lead), key, kind)


def passkey(tokenizer, length: int, depth: float, rng: random.Random, variant: int = 0) -> Sample:
    key = str(rng.randint(10000, 99999))
    return _hidden("passkey", PASSKEY_WORDINGS, key, tokenizer, length, depth, rng, variant)


def needle(tokenizer, length: int, depth: float, rng: random.Random, variant: int = 0) -> Sample:
    key = rng.choice(COLOURS)
    return _hidden("needle", NEEDLE_WORDINGS, key, tokenizer, length, depth, rng, variant)


def lines(tokenizer, length: int, depth: float, rng: random.Random, variant: int = 0) -> Sample:
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
    return Sample("lines", length, depth,
                  chat(tokenizer, prompt, f"The REGISTER_CONTENT in line {names[target]} is"),
                  str(values[target]), "lines")


# (fact, the completion lead that repeats its opening words, the key's kind);
# {key} is the answer
RECALL_WORDINGS = [
    ("The pass key is {key}. Remember it. {key} is the pass key.", "The pass key is",
     "number"),
    ("For the record, the access code of the archive room is {key}.",
     "The access code of the archive room is", "number"),
    ("Her locker at the station was number {key}, painted in white on the door.",
     "Her locker at the station was number", "number"),
    ("The keeper of the old lighthouse painted its door {key} last year.",
     "The keeper of the old lighthouse painted its door", "colour"),
]
RECALL_FILLERS = ("everyday", "prose")  # natural text; the repeated lines are no document


def recall(tokenizer, length: int, depth: float, rng: random.Random, variant: int = 0) -> Sample:
    """A fact at ``depth`` of a natural document; the prompt ends with the fact's
    opening words, which the answer completes. No chat template and no question:
    what is measured is whether the model can still read the fact, not whether it
    follows instructions, so a base model that retrieves densely scores here."""
    kind = RECALL_FILLERS[variant % len(RECALL_FILLERS)]
    fact, lead, kind_of_key = RECALL_WORDINGS[
        (variant // len(RECALL_FILLERS)) % len(RECALL_WORDINGS)]
    key = rng.choice(COLOURS) if kind_of_key == "colour" else str(rng.randint(10000, 99999))
    body = _fit(tokenizer, "", fact.format(key=key), "\n" + lead, length, depth,
                filler_text(kind, length, rng))
    return Sample("recall", length, depth, f"{body}\n{lead}", key, kind)


TASKS = {"passkey": passkey, "lines": lines, "needle": needle, "recall": recall}


def make_samples(tokenizer, tasks, lengths, depths, samples: int, seed: int = 0) -> list[Sample]:
    """``samples`` per (task, length, depth); consecutive samples of a length rotate
    over the fillers, then the wordings."""
    out = []
    for task in tasks:
        for length in lengths:
            variant = 0
            for depth in depths:
                for s in range(samples):
                    rng = random.Random(f"{seed}-{task}-{length}-{depth}-{s}")
                    out.append(TASKS[task](tokenizer, length, depth, rng, variant))
                    variant += 1
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
