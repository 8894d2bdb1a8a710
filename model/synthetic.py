"""Text the project writes itself: sentences for tokenizer training and checkable arithmetic.

Deterministic from a `random.Random`, so checkpoints built from it are reproducible.
"""

from __future__ import annotations

import random

_SUBJECTS = "the cluster|a router|each expert|the server|my friend|the model|a small cat|the old engineer|" \
            "our team|the river|a quiet machine|every token|the scheduler|this actor|the night train"
_VERBS = "sends|reads|builds|finds|moves|counts|watches|answers|carries|loads|writes|serves|follows|keeps"
_OBJECTS = "the message|two numbers|a long story|the weights|every request|the green door|a fast answer|" \
           "the last batch|warm bread|the blue sky|many tokens|a good plan|the map|seven stones"
_TAILS = "today.|again.|before noon.|in the dark.|with care.|for everyone.|without a sound.|quickly.|" \
         "near the sea.|at home.|über alles, naïve café.|— 東京 and Zürich.|at 3:45 pm.|(twice)."


def sentence(rng: random.Random) -> str:
    pick = lambda s: rng.choice(s.split("|"))  # noqa: E731
    text = f"{pick(_SUBJECTS)} {pick(_VERBS)} {pick(_OBJECTS)} {pick(_TAILS)}"
    return text[0].upper() + text[1:]


def addition(rng: random.Random, max_digits: int = 3) -> tuple[str, str]:
    """A problem "a+b=" and its answer, each operand with 1..max_digits digits."""
    a = rng.randrange(10 ** rng.randint(1, max_digits))
    b = rng.randrange(10 ** rng.randint(1, max_digits))
    return f"{a}+{b}=", str(a + b)


def corpus(seed: int, lines: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        if rng.random() < 0.7:
            out.append(" ".join(sentence(rng) for _ in range(rng.randint(1, 3))))
        else:
            out.append(" ".join("".join(addition(rng)) for _ in range(rng.randint(1, 4))))
    return out
