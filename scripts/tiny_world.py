"""A small generated world: the text the embedded model is pretrained on, and two tasks about it.

The world is ~100 animals and plants, each with a colour, a home, a kind and a size drawn from a
fixed seed, plus the arithmetic of numbers up to 20. The pretraining text states these facts in
plain English sentences and short stories; the two fine-tuning tasks ask about them in the layouts
of LLM-Adapters, which the SMT paper evaluates on:

- ``tiny_facts`` (commonsense, ARC's layout): a question with four options, answered
  ``the correct answer is answerN``;
- ``tiny_arith`` (math, GSM8K's layout): a one-step word problem, answered with the sum or
  difference and ``The answer is N``.

Generated rather than taken from a text package so that the facts the tasks test are known to be
in the pretraining text, the model can learn them in minutes on a CPU, and every machine remakes
the same data bit for bit; the test questions are held out from fine-tuning, so a fine-tuned model
must use what pretraining put in its weights.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ENTITIES = [
    "fox",
    "wolf",
    "bear",
    "deer",
    "rabbit",
    "squirrel",
    "owl",
    "eagle",
    "sparrow",
    "crow",
    "salmon",
    "trout",
    "shark",
    "whale",
    "dolphin",
    "octopus",
    "crab",
    "camel",
    "lizard",
    "snake",
    "frog",
    "otter",
    "beaver",
    "goat",
    "cow",
    "sheep",
    "horse",
    "pig",
    "hen",
    "duck",
    "goose",
    "bee",
    "ant",
    "butterfly",
    "beetle",
    "tiger",
    "monkey",
    "parrot",
    "elephant",
    "gorilla",
    "jaguar",
    "yak",
    "bat",
    "mole",
    "worm",
    "badger",
    "hedgehog",
    "mouse",
    "rat",
    "lion",
    "zebra",
    "giraffe",
    "hippo",
    "rhino",
    "panda",
    "koala",
    "kangaroo",
    "penguin",
    "seal",
    "walrus",
    "heron",
    "swan",
    "pelican",
    "falcon",
    "hawk",
    "robin",
    "finch",
    "moth",
    "snail",
    "slug",
    "turtle",
    "tortoise",
    "newt",
    "toad",
    "eel",
    "oak",
    "pine",
    "cactus",
    "fern",
    "rose",
    "tulip",
    "daisy",
    "moss",
    "palm",
    "maple",
    "lily",
    "sunflower",
    "seaweed",
    "coral",
    "willow",
    "birch",
    "ivy",
    "clover",
    "thistle",
    "orchid",
    "bamboo",
    "reed",
    "lotus",
    "poppy",
    "violet",
]
COLORS = ("red", "brown", "grey", "white", "black", "green", "yellow", "orange", "blue", "pink")
HOMES = ("forest", "ocean", "desert", "river", "mountain", "farm", "jungle", "garden", "cave", "field")
KINDS = ("mammal", "bird", "fish", "insect", "reptile", "plant")
SIZES = ("tiny", "small", "large", "huge")
NAMES = ("Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Jack", "Emma", "Leo", "Nora", "Max", "Ella")
THINGS = ("apples", "books", "coins", "shells", "stones", "cards", "pens", "eggs", "stamps", "cups")
NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
ATTRIBUTES = ("color", "home", "kind", "size")


@dataclass(frozen=True)
class Thing:
    name: str
    color: str
    home: str
    kind: str
    size: str


def make_world(seed: int = 0) -> list[Thing]:
    """Every entity with its attributes, the same for a seed on every machine."""
    rng = random.Random(seed)
    return [
        Thing(name, rng.choice(COLORS), rng.choice(HOMES), rng.choice(KINDS), rng.choice(SIZES))
        for name in ENTITIES
    ]


def pretraining_text(world: list[Thing], rng: random.Random, *, sentences: int) -> list[str]:
    """Documents of plain sentences: facts about the world, short stories, arithmetic."""
    facts = [
        "The {n} is {c}.",
        "A {n} is a {k}.",
        "The {n} lives in the {h}.",
        "You can find the {n} in the {h}.",
        "The {n} is a {s} {k}.",
        "Most {n}s are {c}.",
        "The {n} is {c} and lives in the {h}.",
        "In the {h} there is a {s} {c} {n}.",
        "Every {n} I have seen was {c}.",
        "The {h} is home to the {n}.",
    ]
    stories = [
        "One day a {n} went for a walk in the {h}. It was a {s} {c} {k}. It was happy there.",
        "If you go to the {h}, you may see a {n}. The {n} is {c}, and it is a {k}.",
        "My friend saw a {c} {n}. Of course it was {c}: every {n} is {c}. It lives in the {h}.",
    ]
    # Quiz talk: the words the tasks answer with ("the correct answer is", "The answer is N"), in
    # sentences, never in the tasks' instruction layout or with numbered options.
    quizzes = [
        "Question: where does the {n} live? The correct answer is the {h}.",
        "Quiz time. What color is the {n}? The correct answer is {c}, not {x}.",
        "Is the {n} a {k}? Yes, the correct answer is that it is a {k}.",
        "Someone asked how big the {n} is. The answer is that it is {s}.",
    ]
    documents, count = [], 0
    while count < sentences:
        parts = []
        for _ in range(rng.randint(4, 10)):
            roll = rng.random()
            if roll < 0.08:
                t = rng.choice(world)
                other = rng.choice([c for c in COLORS if c != t.color])
                parts.append(
                    rng.choice(quizzes).format(n=t.name, c=t.color, h=t.home, k=t.kind, s=t.size, x=other)
                )
            elif roll < 0.55:
                t = rng.choice(world)
                parts.append(rng.choice(facts).format(n=t.name, c=t.color, h=t.home, k=t.kind, s=t.size))
            elif roll < 0.7:
                t = rng.choice(world)
                parts.append(rng.choice(stories).format(n=t.name, c=t.color, h=t.home, k=t.kind, s=t.size))
            else:
                parts.append(arithmetic_sentence(rng))
        documents.append(" ".join(parts))
        count += len(parts)
    return documents


def arithmetic_sentence(rng: random.Random) -> str:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5 or a < b:
        c, words, sign = a + b, "plus", "+"
    else:
        c, words, sign = a - b, "minus", "-"
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    return rng.choice(
        [
            f"{a} {sign} {b} = {c}.",
            f"{a} {words} {b} is {c}.",
            f"{NUMBER_WORDS[a].capitalize()} {words} {NUMBER_WORDS[b]} makes {NUMBER_WORDS[c] if c <= 20 else c}.",
            f"{name} counted {a} {thing}, then {b} more: {a} + {b} = {a + b}.",
            f"{name} had {max(a, b)} {thing} and lost {min(a, b)}, so {max(a, b)} - {min(a, b)} = {max(a, b) - min(a, b)}.",
            f"What is {a} plus {b}? The answer is {a + b}.",
        ]
    )


# ---- the two tasks, in LLM-Adapters' layouts ----------------------------------------------------


def facts_questions(world: list[Thing], rng: random.Random) -> list[dict]:
    """Every question about one entity's colour, home, kind or size, with four options each."""
    values = {"color": COLORS, "home": HOMES, "kind": KINDS, "size": SIZES}
    asks = {
        "color": "What color is the {n}?",
        "home": "Where does the {n} live?",
        "kind": "What kind of living thing is the {n}?",
        "size": "How big is the {n}?",
    }
    records = []
    for thing in world:
        for attribute in ATTRIBUTES:
            right = getattr(thing, attribute)
            wrong = rng.sample([v for v in values[attribute] if v != right], 3)
            options = [right, *wrong]
            rng.shuffle(options)
            number = options.index(right) + 1
            choices = " ".join(f"Answer{i}: {o}" for i, o in enumerate(options, start=1))
            records.append(
                {
                    "instruction": (
                        f"Please choose the correct answer to the question: {asks[attribute].format(n=thing.name)}\n\n"
                        f"{choices}\n\nAnswer format: answer1/answer2/answer3/answer4"
                    ),
                    "input": "",
                    "output": f"the correct answer is answer{number}",
                    "answer": f"answer{number}",
                }
            )
    return records


def arith_questions(rng: random.Random) -> list[dict]:
    """One-step word problems over every pair of numbers up to 20 (sums, and differences a >= b)."""
    records = []
    for a in range(1, 21):
        for b in range(1, 21):
            name, thing = rng.choice(NAMES), rng.choice(THINGS)
            if rng.random() < 0.5 or a < b:
                question = (
                    f"{name} has {a} {thing}. {name} gets {b} more. How many {thing} does {name} have now?"
                )
                work, answer = f"{name} has {a} + {b} = {a + b} {thing} now.", a + b
            else:
                question = (
                    f"{name} has {a} {thing}. {name} gives away {b}. How many {thing} does {name} have left?"
                )
                work, answer = f"{name} has {a} - {b} = {a - b} {thing} left.", a - b
            records.append(
                {
                    "instruction": question,
                    "input": "",
                    "output": f"{work} The answer is {answer}",
                    "answer": str(answer),
                }
            )
    return records


def split(records: list[dict], rng: random.Random, *, test: int, val: int) -> dict[str, list[dict]]:
    """Disjoint train / val / test splits of whole questions."""
    records = list(records)
    rng.shuffle(records)
    return {"test": records[:test], "val": records[test : test + val], "train": records[test + val :]}
