"""Harder retrieval than one needle, after RULER's kinds (Hsieh et al. 2024), built from our own haystack:

- multikey: four "special magic number" sentences with different keys; the question names one key. A head
  that copies whatever number it saw last answers wrongly.
- multivalue: one key with four numbers spread over the context; the answer is all four.
- vartrack: a chain of variable assignments (VAR A = 12345. VAR B = VAR A. ...) spread over the context beside
  a distractor chain; the answer is every variable that holds the value, so the model must follow each link.

Each instance is generated from its index alone (seeded), so a grid is the same on every run; the cell's
depth places the instance's first sentence and the others keep seeded places after or around it. A cell
is correct when the response contains every answer string (recall: the share it contains).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..niah import Needle

TASKS = ("niah", "multikey", "multivalue", "vartrack")
_WORDS = ("amber", "basalt", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
          "lagoon", "meadow", "nectar", "orchid", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "violet",
          "willow", "yarrow", "zephyr")


@dataclass(frozen=True)
class TaskNeedle(Needle):
    """A task instance: its sentences, where each goes relative to the cell's depth, and the answers."""

    inserts: tuple[str, ...] = ()
    offsets: tuple[float | None, ...] = ()  # None: at the cell's depth; a number: at that depth of the context
    answers: tuple[str | None, ...] = ()  # per insert, the answer inside it (None: a distractor)

    def placed(self, depth: float) -> list[tuple[str, float, str | None]]:
        """(sentence, depth, answer) for `build_inserted_prompt`, with the cell at `depth`."""
        return [(text, depth if offset is None else offset, answer)
                for text, offset, answer in zip(self.inserts, self.offsets, self.answers)]

    @property
    def expected(self) -> list[str]:
        return [a for a in self.answers if a is not None]


def _key(rng: random.Random) -> str:
    return "-".join(rng.sample(_WORDS, 2))


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def instance(task: str, index: int) -> TaskNeedle:
    rng = random.Random(f"{task}-{index}")
    if task == "multikey":
        keys, values = [_key(rng) for _ in range(4)], [_number(rng) for _ in range(4)]
        inserts = tuple(f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values))
        return _needle(inserts, (None, *(rng.random() for _ in range(3))), (values[0], None, None, None),
                       f"What is the special magic number for {keys[0]} mentioned in the book?")
    if task == "multivalue":
        key, values = _key(rng), [_number(rng) for _ in range(4)]
        inserts = tuple(f"One of the special magic numbers for {key} is: {v}." for v in values)
        return _needle(inserts, (None, *(rng.random() for _ in range(3))), tuple(values),
                       f"What are all the special magic numbers for {key} mentioned in the book?")
    if task == "vartrack":
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(8)]
        value, other = _number(rng)[:5], _number(rng)[:5]
        chain, decoy = names[:4], names[4:]
        inserts = [f"VAR {chain[0]} = {value}.", f"VAR {decoy[0]} = {other}."]
        inserts += [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        inserts += [f"VAR {b} = VAR {a}." for a, b in zip(decoy, decoy[1:])]
        spread = sorted(rng.random() for _ in range(3))
        offsets = (None, rng.random(), *spread, *sorted(rng.random() for _ in range(3)))
        return _needle(tuple(inserts), offsets, (chain[0], None, *chain[1:], None, None, None),
                       f"Which variables are assigned the value {value}? Name every one of them.")
    raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")


def _needle(inserts: tuple[str, ...], offsets: tuple, answers: tuple, question: str) -> TaskNeedle:
    return TaskNeedle(needle=" ".join(inserts), question=question,
                      real_needle=" ".join(a for a in answers if a is not None),
                      inserts=inserts, offsets=offsets, answers=answers)


def task_recall(needle: TaskNeedle, response: str) -> float:
    """The share of the instance's answers the response contains (case-insensitive)."""
    found = [a.lower() in response.lower() for a in needle.expected]
    return sum(found) / len(found)
