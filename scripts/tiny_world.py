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


_PLAIN_FACTS = (
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
)


def pretraining_text(world: list[Thing], rng: random.Random, *, sentences: int) -> list[str]:
    """Documents of plain sentences: facts about the world, short stories, arithmetic."""
    facts = _PLAIN_FACTS
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


# ---- the richer corpus of the world model (models/world-llama) --------------------------------------
#
# The first model learned one register of plain sentences and met the tasks' question-and-answer
# layout only in fine-tuning, so it started 10 nats per response token deep (issue 16). This corpus
# states the same facts in many phrasings, asks about them in several question-and-answer layouts
# (numbered and lettered options, chats, quizzes, exam sheets), and works word problems in prose, so
# that the pretrained model knows the facts and the skill of picking an option, and fine-tuning
# only has to teach a new layout, as on a real LLM. The tasks' own templates never appear:
# no "Please choose the correct answer to the question", no "AnswerN:", no "gets N more".

QUESTIONS = {
    "color": ("What color is the {n}?", "What is the color of the {n}?", "Which color does the {n} have?"),
    "home": ("Where does the {n} live?", "Where is the {n} found?", "What is the home of the {n}?"),
    "kind": (
        "What kind of thing is the {n}?",
        "Is the {n} a bird, a fish or something else?",
        "What is a {n}?",
    ),
    "size": ("How big is the {n}?", "What size is the {n}?", "Is the {n} big or small?"),
}
_SAY = {
    "color": ("The {n} is {v}.", "It is {v}.", "The color of the {n} is {v}.", "{V}. The {n} is {v}."),
    "home": (
        "The {n} lives in the {v}.",
        "In the {v}.",
        "You find the {n} in the {v}.",
        "Its home is the {v}.",
    ),
    "kind": ("The {n} is a {v}.", "It is a {v}.", "A {n} is a kind of {v}.", "{V}. The {n} is a {v}."),
    "size": ("The {n} is {v}.", "It is {v}.", "A {n} is {v}.", "{V}. The {n} is {v}."),
}
_VALUES = {"color": COLORS, "home": HOMES, "kind": KINDS, "size": SIZES}
_FACTS = (
    *_PLAIN_FACTS,
    "A {s} animal or plant of the {h}: the {n}.",
    "People say the {n} is {c}, and they are right.",
    "The {n}, a {k}, is {s}.",
    "If you want to see a {n}, go to the {h}.",
    "The {n} is not {x}. It is {c}.",
    "No {n} lives in the {y}; the {n} lives in the {h}.",
    "Compared with a mouse, the {n} is {s}.",
    "The {c} {n} is a {k} of the {h}.",
)
_STORIES = (
    "One day a {n} went for a walk in the {h}. It was a {s} {c} {k}. It was happy there.",
    "If you go to the {h}, you may see a {n}. The {n} is {c}, and it is a {k}.",
    "My friend saw a {c} {n} near the {h}. I was not surprised: the {n} is {c}.",
    'Grandma told us about the {n}. "It is {s}," she said, "and it lives in the {h}."',
    "We drew a {n} at school. I used my {c} pencil, because the {n} is {c}.",
)


def _fill(template: str, t: Thing, rng: random.Random) -> str:
    x = rng.choice([c for c in COLORS if c != t.color])
    y = rng.choice([h for h in HOMES if h != t.home])
    return template.format(n=t.name, c=t.color, h=t.home, k=t.kind, s=t.size, x=x, y=y)


def _options(t: Thing, attribute: str, rng: random.Random) -> tuple[list[str], int]:
    right = getattr(t, attribute)
    options = [right, *rng.sample([v for v in _VALUES[attribute] if v != right], 3)]
    rng.shuffle(options)
    return options, options.index(right)


def _choice_question(t: Thing, attribute: str, rng: random.Random, *, layouts: int = 6) -> str:
    """A question about one fact with options in one of several layouts, and its answer.

    The first six layouts name the option's number or letter before its value, so a model must
    know the value before it can point at it. ``layouts=10`` adds four that teach the pointing
    itself: the value said first and then the number of the option that holds it, the value
    given in the question and only its number asked for (a pure look-up in the context), and a
    number-first layout of its own."""
    options, i = _options(t, attribute, rng)
    ask = rng.choice(QUESTIONS[attribute]).format(n=t.name)
    right = options[i]
    letters = "abcd"
    layout = rng.randrange(layouts)
    if layout == 6:
        listed = "\n".join(f"{j + 1}. {o}" for j, o in enumerate(options))
        return f"Q: {ask}\n{listed}\nA: {right}, which is number {i + 1}."
    if layout == 7:
        listed = " ".join(f"[{j + 1}] {o}" for j, o in enumerate(options))
        return f"{ask} Options: {listed}. {right.capitalize()} is right, so the pick is [{i + 1}]."
    if layout == 8:
        listed = " ".join(f"({j + 1}) {o}" for j, o in enumerate(options))
        return f"Which number does {right} have here? {listed}\n{right.capitalize()} is number {i + 1}."
    if layout == 9:
        listed = "\n".join(f"#{j + 1} {o}" for j, o in enumerate(options))
        return f"Pick one. {ask}\n{listed}\nPick: #{i + 1}"
    if layout == 0:
        listed = " ".join(f"({j + 1}) {o}" for j, o in enumerate(options))
        return f"Q: {ask}\n{listed}\nA: ({i + 1}) {right}"
    if layout == 1:
        listed = "\n".join(f"{letters[j]}) {o}" for j, o in enumerate(options))
        return f"Question: {ask}\n{listed}\nThe right answer is {letters[i]}) {right}."
    if layout == 2:
        listed = " ".join(f"Choice {j + 1}: {o}." for j, o in enumerate(options))
        return f"{ask} {listed} The right choice is choice {i + 1}, {right}."
    if layout == 3:
        listed = ", ".join(options[:-1]) + f" or {options[-1]}"
        return f"Quiz: {ask} Is it {listed}? The correct answer is {right}."
    if layout == 4:
        listed = "\n".join(f"Option {j + 1} - {o}" for j, o in enumerate(options))
        return f"Exam question. {ask}\n{listed}\nSolution: option {i + 1} ({right})."
    listed = " / ".join(options)
    return f"User: {ask} ({listed})\nAssistant: {rng.choice(_SAY[attribute]).format(n=t.name, v=right, V=right.capitalize())}"


_DRILL_LISTS = (  # how a drill lists its options: number i (from 1) and value o
    lambda i, o: f"({i}) {o}",
    lambda i, o: f"{i}. {o}",
    lambda i, o: f"[{i}] {o}",
    lambda i, o: f"#{i} {o}",
    lambda i, o: f"no.{i} {o}",
)
_DRILL_ASKS = (  # a pure look-up: the value {v} named, the number after a cue with no space
    "Which number is {v}? #",
    "Find {v}: it is no.",
    "{V} is option",
    "Where is {v} in the list? At no.",
)
_DRILL_CUES = ("Number #", "Pick no.", "It is #", "The right one is option")


def _drill(world: list[Thing], rng: random.Random) -> str:
    """One look-up drill: four options, then the number of the one that holds a value.

    Half the drills name the value (a pure look-up in the context: find it, say the number before
    it); half ask a fact of the world whose answer is among the options, so the model must know the
    value and then point at it. The number follows its cue with no space, as the tasks' "answerN"
    does. None uses the tasks' "AnswerN:" options."""
    attribute = rng.choice(ATTRIBUTES)
    t = rng.choice(world)
    options, i = _options(t, attribute, rng)
    listing = rng.choice(_DRILL_LISTS)
    listed = rng.choice((" ", "\n", "; ")).join(listing(j + 1, o) for j, o in enumerate(options))
    if rng.random() < 0.5:
        ask = rng.choice(_DRILL_ASKS).format(v=options[i], V=options[i].capitalize())
        return f"{listed}\n{ask}{i + 1}"
    question = rng.choice(QUESTIONS[attribute]).format(n=t.name)
    return f"{question}\n{listed}\n{rng.choice(_DRILL_CUES)}{i + 1}"


def pointing_question(t: Thing, attribute: str, kind: str, rng: random.Random) -> tuple[str, int]:
    """One four-option question in the drills' "(1) red (2) blue ..." layout and its answer's index.

    ``lookup`` names the value in the question (find it in the list); ``knowledge`` asks the fact
    (know the value, then find it). The prompt ends at the number's cue "#". The pointing probe
    (``check_base.pointing_probe``) asks these, and ``pretrain_tiny --pointing_rows`` trains on them."""
    options, right = _options(t, attribute, rng)
    listed = " ".join(f"({j + 1}) {o}" for j, o in enumerate(options))
    if kind == "lookup":
        return f"{listed}\nWhich number is {options[right]}? #", right
    return f"{QUESTIONS[attribute][0].format(n=t.name)}\n{listed}\nNumber #", right


def _open_question(t: Thing, attribute: str, rng: random.Random) -> str:
    """A question about one fact answered in words, as talk between two people."""
    ask = rng.choice(QUESTIONS[attribute]).format(n=t.name)
    value = getattr(t, attribute)
    say = rng.choice(_SAY[attribute]).format(n=t.name, v=value, V=value.capitalize())
    who = rng.choice(
        (("User", "Assistant"), ("Student", "Teacher"), ("Q", "A"), ("Child", "Parent"), ("Human", "Bot"))
    )
    return f"{who[0]}: {ask}\n{who[1]}: {say}"


def _numbers(rng: random.Random) -> tuple[int, int, int, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5 or a < b:
        return a, b, a + b, "+"
    return a, b, a - b, "-"


def _word_problem(rng: random.Random) -> str:
    """A one-step word problem worked in prose, in layouts other than the math task's."""
    a, b, c, sign = _numbers(rng)
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    if sign == "+":
        story = rng.choice(
            (
                f"{name} had {a} {thing}. Then {name} found {b} {thing}.",
                f"There were {a} {thing} in a box, and someone put in {b} more.",
                f"{name} bought {a} {thing} on Monday and {b} {thing} on Tuesday.",
            )
        )
        ask = rng.choice((f"How many {thing} are there in all?", "What is the total?", "How many now?"))
        work = f"{a} + {b} = {c}"
        result = rng.choice((f"{name} has {c} {thing} now.", f"There are {c} {thing} in all."))
    else:
        story = rng.choice(
            (
                f"{name} had {a} {thing}. {name} lost {b} of them.",
                f"There were {a} {thing} on the table, and {b} were taken away.",
                f"{name} started with {a} {thing} and gave {b} to a friend.",
            )
        )
        ask = rng.choice((f"How many {thing} remain?", "How many are left?", "What is left?"))
        work = f"{a} - {b} = {c}"
        result = rng.choice((f"{name} has {c} {thing} left.", f"{c} {thing} are left."))
    layout = rng.randrange(4)
    if layout == 0:
        return f"Q: {story} {ask}\nA: {work}. {result} So the answer is {c}."
    if layout == 1:
        return f"{story} {ask} We compute {work}, which gives {c}. {result}"
    if layout == 2:
        return f"User: {story} {ask}\nAssistant: {work}, so there are {c}."
    return f"Problem: {story} {ask}\nWorking: {work}.\nResult: {result} The answer is {c}."


def _sum(rng: random.Random) -> str:
    a, b, c, sign = _numbers(rng)
    words = "plus" if sign == "+" else "minus"
    return rng.choice(
        (
            f"{a} {sign} {b} = {c}.",
            f"{a} {words} {b} is {c}.",
            f"{NUMBER_WORDS[a].capitalize()} {words} {NUMBER_WORDS[b]} makes {NUMBER_WORDS[c] if c <= 20 else c}.",
            f"Q: What is {a} {sign} {b}?\nA: {c}",
            f"What is {a} {words} {b}? It is {c}.",
            f"If you take {a} and {'add' if sign == '+' else 'subtract'} {b}, you get {c}.",
        )
    )


_STATE = {  # one sentence stating one attribute, in the phrasings the fact probe uses and others
    "color": (
        "The {n} is {c}.",
        "The color of the {n} is {c}.",
        "Most {n}s are {c}.",
        "The {n} has a {c} color.",
    ),
    "home": ("The {n} lives in the {h}.", "You can find the {n} in the {h}.", "The {h} is home to the {n}."),
    "kind": ("A {n} is a {k}.", "A {n} is a kind of {k}.", "The {n} belongs to the {k}s."),
    "size": ("Compared with a mouse, the {n} is {s}.", "The {n} is {s}.", "In size, the {n} is {s}."),
}


def _entry(t: Thing, rng: random.Random) -> str:
    """An encyclopedia entry: every attribute of one thing, each in one of its phrasings."""
    sentences = [_fill(rng.choice(_STATE[attribute]), t, rng) for attribute in ATTRIBUTES]
    rng.shuffle(sentences)
    return " ".join([f"{t.name.capitalize()}.", *sentences])


def _instruction(t: Thing, attribute: str, rng: random.Random) -> str:
    """A question about one fact in the Alpaca wrapper the job's prompts use: open, or with options
    in layouts of its own (never the tasks' numbered "AnswerN:" options or their word problems)."""
    from smt_dist.recipes.data import format_prompt

    value = getattr(t, attribute)
    ask = rng.choice(QUESTIONS[attribute]).format(n=t.name)
    if rng.random() < 0.5:
        say = rng.choice(_SAY[attribute]).format(n=t.name, v=value, V=value.capitalize())
        return format_prompt({"instruction": ask, "input": ""}) + say
    options, i = _options(t, attribute, rng)
    word = rng.choice(("option", "choice", "number"))
    listed = " ".join(f"{word.capitalize()} {j + 1}) {o}" for j, o in enumerate(options))
    instruction = f"{ask}\n\n{listed}\n\nReply with the {word} you pick."
    say = rng.choice((f"the correct answer is {word} {i + 1}", f"the right one is {word} {i + 1}, {value}"))
    return format_prompt({"instruction": instruction, "input": ""}) + say


# Upper bounds of the registers' shares (entry, quiz, instruction, word problems, sums; the rest
# mixes sentences): the first world model's mix, and one that asks many more questions.
STATEMENT_MIX = (0.25, 0.45, 0.55, 0.67, 0.73)
QUESTION_MIX = (0.10, 0.55, 0.80, 0.88, 0.92)
POINTING_MIX = (0.08, 0.68, 0.85, 0.92, 0.95)  # with pointing=True: mostly options to point at


def world_text(
    world: list[Thing],
    rng: random.Random,
    *,
    documents: int,
    mix: tuple[float, ...] = STATEMENT_MIX,
    pointing: bool = False,
    drills: float = 0.0,
) -> list[str]:
    """Documents for the world model: entries, quizzes, chats, instructions, word problems, sums.

    Each document is one register (an encyclopedia entry, a quiz sheet, a chat, an instruction and
    its response, a page of sums, or a mix of sentences), so the model sees documents begin and end
    (the pretraining script puts an eos after each) and several layouts of questions and answers.
    Facts dominate: every fact of the world is stated some hundreds of times in a pretraining run.
    ``mix`` sets the registers' shares (``QUESTION_MIX``: more than half quizzes and instructions,
    for a model that must answer questions about an entity, not only complete statements).
    ``pointing`` makes 85% of a quiz sheet's questions multiple choice, in ten layouts (see
    ``_choice_question``), for a model that must name the option that holds what it knows.
    ``drills`` is the share of documents that are sheets of look-up drills (``_drill``): short,
    dense exercises in finding an option and saying its number, since a model shown the pointing
    only inside quizzes never learnt it (docs/quality.md). At 0 the text is unchanged.
    """
    entry, quiz, instruction, problems, sums = mix
    choice_share, layouts = (0.85, 10) if pointing else (0.6, 6)
    out = []
    for _ in range(documents):
        if drills and rng.random() < drills:  # a sheet of look-up drills
            out.append("\n\n".join(_drill(world, rng) for _ in range(rng.randint(4, 8))))
            continue
        register = rng.random()
        parts: list[str] = []
        if register < entry:  # an encyclopedia entry about one thing
            parts = [_entry(rng.choice(world), rng)]
        elif register < quiz:  # a quiz sheet or a chat about several things
            for _ in range(rng.randint(2, 5)):
                t, attribute = rng.choice(world), rng.choice(ATTRIBUTES)
                if rng.random() < choice_share:
                    parts.append(_choice_question(t, attribute, rng, layouts=layouts))
                else:
                    parts.append(_open_question(t, attribute, rng))
            parts = ["\n\n".join(parts)]
        elif register < instruction:  # an instruction and its response
            parts = [_instruction(rng.choice(world), rng.choice(ATTRIBUTES), rng)]
        elif register < problems:  # worked word problems
            parts = ["\n\n".join(_word_problem(rng) for _ in range(rng.randint(2, 4)))]
        elif register < sums:  # a page of sums
            parts = ["\n".join(_sum(rng) for _ in range(rng.randint(4, 8)))]
        else:  # a mix of sentences
            for _ in range(rng.randint(4, 9)):
                roll = rng.random()
                t = rng.choice(world)
                if roll < 0.65:
                    fact = _fill(rng.choice(_FACTS), t, rng)
                    parts.append(fact[0].lower() + fact[1:] if rng.random() < 0.15 else fact)
                elif roll < 0.85:
                    parts.append(_fill(rng.choice(_STORIES), t, rng))
                else:
                    parts.append(_sum(rng).replace("\n", " "))
        out.append(" ".join(parts))
    return out
