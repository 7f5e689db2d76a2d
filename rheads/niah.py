"""Needle-in-a-haystack prompts: haystack text, needles, prompt building and answer scoring.

Shared by the profiler (which finds retrieval heads) and the evaluation (which grades compression),
so both build prompts the same way. Everything happens in token space so that a prompt has exactly
the requested length and the needle's answer span is known to the token.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

PROMPT_BEFORE = "This is a very long story book: <book> "
PROMPT_AFTER = " </book>.\nBased on the content of the book, answer the question: {question}"
_MARKER = "\x00CONTEXT\x00"


@dataclass(frozen=True)
class Needle:
    needle: str  # the sentence inserted into the haystack
    question: str
    real_needle: str  # the answer, a substring of the needle


@dataclass(frozen=True)
class NiahPrompt:
    input_ids: list[int]
    answer_span: tuple[int, int]  # [start, end) token positions of the answer inside input_ids
    needle_span: tuple[int, int]  # [start, end) token positions of the whole needle sentence
    answer_spans: tuple[tuple[int, int], ...] = ()  # every inserted answer's, in prompt order (several inserts)


def data_path(name: str) -> Path:
    """A file or directory shipped inside the rheads package (rheads/data)."""
    return Path(str(resources.files("rheads") / "data" / name))


def load_needles(path: Path | None = None) -> list[Needle]:
    """Needles from a JSONL file (needle, question, real_needle); default: the 3 published ones."""
    path = path or data_path("needles.jsonl")
    needles = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            needles.append(Needle(row["needle"], row["question"], row["real_needle"]))
    return needles


def haystack_files(paths: list[Path] | None = None) -> list[Path]:
    """The .txt files of the haystack, in name order; default: the text shipped with rheads."""
    files: list[Path] = []
    for path in paths or [data_path("haystack")]:
        path = Path(path)
        files.extend(sorted(path.glob("*.txt")) if path.is_dir() else [path])
    if not files:
        raise FileNotFoundError(f"no haystack .txt files in {paths}")
    return files


@lru_cache(maxsize=4)
def _haystack_ids(tokenizer, files: tuple[Path, ...]) -> tuple[int, ...]:
    text = "\n\n".join(Path(f).read_text() for f in files)
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def _template_parts(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the context, using the tokenizer's chat template when it has one."""
    content = PROMPT_BEFORE + _MARKER + PROMPT_AFTER.format(question=question)
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        special = False  # the template writes its own BOS where the model wants one
    else:
        text, special = content + "\nAnswer:", True
    before, after = text.split(_MARKER)
    before_ids = tokenizer(before, add_special_tokens=special)["input_ids"]
    after_ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    return before_ids, after_ids


def _span_of(tokenizer, text: str, sub: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids of text and the [start, end) token range covering the substring sub (case-insensitive)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.lower().find(sub.lower().strip())
    if start < 0:
        raise ValueError(f"answer {sub!r} is not inside needle {text!r}")
    end = start + len(sub.strip())
    tokens = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > start]
    return encoded["input_ids"], (tokens[0], tokens[-1] + 1)


def build_prompt(tokenizer, needle: Needle, length: int, depth: float,
                 haystack: list[Path] | None = None) -> NiahPrompt:
    """A prompt of exactly `length` tokens with the needle at `depth` (0 = start, 1 = end of context).

    The needle goes at a sentence boundary: the insertion point moves back to just after the nearest
    full stop, as the needle-in-a-haystack test does. A haystack shorter than needed is repeated.
    """
    return build_inserted_prompt(tokenizer, [(needle.needle, depth, needle.real_needle)], needle.question, length,
                                 haystack)


def build_inserted_prompt(tokenizer, inserts: list[tuple[str, float, str | None]], question: str, length: int,
                          haystack: list[Path] | None = None) -> NiahPrompt:
    """`build_prompt` for several sentences: (sentence, depth, the answer inside it or None) each, placed in
    the order given where depths tie. The prompt's spans are those of the first sentence with an answer;
    `answer_spans` lists every answer's."""
    before, after = _template_parts(tokenizer, question)
    encoded = []
    for sentence, depth, answer in inserts:
        ids, span = _span_of(tokenizer, " " + sentence, answer or sentence)
        encoded.append((ids, span if answer else None, depth))
    budget = length - len(before) - len(after) - sum(len(ids) for ids, _, _ in encoded)
    if budget < 0:
        raise ValueError(f"length {length} is shorter than the prompt without context")
    hay = _haystack_ids(tokenizer, tuple(haystack_files(haystack)))
    context = [hay[i % len(hay)] for i in range(budget)]
    points = []
    for _, _, depth in encoded:
        insert = int(round(depth * budget))
        if 0 < insert < budget:
            while insert > 0 and "." not in tokenizer.decode([context[insert - 1]]):
                insert -= 1
        points.append(insert)
    ids, at, spans = list(before), 0, {}  # insert index -> (its answer span, its sentence's span)
    for index in sorted(range(len(encoded)), key=lambda i: points[i]):  # stable: ties keep the given order
        sentence_ids, span, _ = encoded[index]
        ids += context[at:points[index]]
        at = points[index]
        if span is not None:
            spans[index] = ((len(ids) + span[0], len(ids) + span[1]), (len(ids), len(ids) + len(sentence_ids)))
        ids += sentence_ids
    ids += context[at:] + after
    if not spans:
        raise ValueError("no inserted sentence carries an answer")
    answer_span, needle_span = spans[min(spans)]
    return NiahPrompt(ids, answer_span, needle_span, tuple(sorted(a for a, _ in spans.values())))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def unigram_recall(reference: str, response: str) -> float:
    """Share of the reference's words (with multiplicity) that the response contains (ROUGE-1 recall)."""
    ref = Counter(_words(reference))
    if not ref:
        return 0.0
    got = Counter(_words(response))
    return sum(min(count, got[word]) for word, count in ref.items()) / sum(ref.values())
