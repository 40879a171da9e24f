"""The world corpus's look-up drills say the number of the option that holds the right value.

The reference is the drill's own text read back: its options parsed from the listing, the value
named in the look-up's question or the fact of the entity the knowledge question names, checked
against the world the drill was made from. A drill that points at the wrong option would teach
the base model to point wrongly (docs/quality.md, the world model)."""

from __future__ import annotations

import random
import re
import sys

from paths import REPO

sys.path.insert(0, str(REPO / "scripts"))

import tiny_world

OPTION = re.compile(r"(\d)\W* (\w+)")  # "(1) red", "1. red", "[1] red", "#1 red", "no.1 red"


def test_every_drill_points_at_the_option_that_holds_its_answer():
    world = tiny_world.make_world(0)
    rng = random.Random(0)
    kinds = set()
    for _ in range(400):
        lines = tiny_world._drill(world, rng).split("\n")
        ask, answer = lines[-1][:-1], int(lines[-1][-1])
        options = dict((int(n), v) for n, v in OPTION.findall("\n".join(lines[:-1])))
        assert sorted(options) == [1, 2, 3, 4], lines
        if any(ask == cue for cue in tiny_world._DRILL_CUES):  # knowledge: the fact of the one named
            named = [t for t in world if re.search(rf"\b{t.name}\b", lines[0])]
            thing = max(named, key=lambda t: len(t.name))
            facts = {getattr(thing, a) for a in tiny_world.ATTRIBUTES}
            assert [v for v in options.values() if v in facts] == [options[answer]], lines
            kinds.add("knowledge")
        else:  # look-up: the value the question names
            assert re.search(rf"\b{options[answer]}\b", ask, re.IGNORECASE), lines
            assert sum(bool(re.search(rf"\b{v}\b", ask, re.IGNORECASE)) for v in options.values()) == 1
            kinds.add("lookup")
    assert kinds == {"knowledge", "lookup"}


def test_no_drills_leaves_the_world_text_as_it_was():
    """Stages 1 and 2 were made without drills; their text must come out the same today."""
    world = tiny_world.make_world(0)
    before = tiny_world.world_text(world, random.Random(5), documents=60)
    assert tiny_world.world_text(world, random.Random(5), documents=60, drills=0.0) == before
    drilled = tiny_world.world_text(world, random.Random(5), documents=60, drills=0.5)
    sheets = sum(d.count("\n\n") >= 3 and d.split("\n")[-1][-1].isdigit() for d in drilled)
    assert 15 <= sheets <= 45  # about half of 60 (binomial sd 3.9)
