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


def facts_listed(world, question: str, options: dict[int, str]) -> list[str]:
    """The listed values that are facts of the entity the question names (the longest name that
    matches, so "sea lion" wins over "lion")."""
    thing = max((t for t in world if re.search(rf"\b{t.name}\b", question)), key=lambda t: len(t.name))
    facts = {getattr(thing, a) for a in tiny_world.ATTRIBUTES}
    return [v for v in options.values() if v in facts]


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
            assert facts_listed(world, lines[0], options) == [options[answer]], lines
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


def test_pointing_drills_train_on_the_answer_digit_and_ignore_padding():
    """``scripts/pretrain_tiny.py``: each row's only label is the answer's digit, the digit names
    the option holding the asked value, and the model's loss on either labelling matches the same
    cross-entropies taken row by row on the unpadded text."""
    import pretrain_tiny
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(REPO / "models" / "world-llama")
    kinds = ("lookup", "knowledge")
    batch = pretrain_tiny.drill_batch(tokenizer, random.Random(0), rows=24, kinds=kinds, loss="answer")
    every = pretrain_tiny.drill_batch(tokenizer, random.Random(0), rows=24, kinds=kinds, loss="all")
    assert torch.equal(every["input_ids"], batch["input_ids"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(pretrain_tiny.model_config(tokenizer)).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        answer_loss, all_loss = model(**batch).loss, model(**every).loss
    world, seen = tiny_world.make_world(0), set()
    per_row_answer, per_row_all, tokens = [], [], 0
    for row in range(len(batch["input_ids"])):
        n = int(batch["attention_mask"][row].sum())
        real = batch["input_ids"][row, :n]
        text = tokenizer.decode(real)
        assert text[:-1].endswith("#"), text
        lines, answer = text.split("\n"), int(text[-1])
        asked = re.fullmatch(r"Which number is (\w+)\? #\d", lines[-1])
        options = dict((int(n), v) for n, v in OPTION.findall(lines[0] if asked else lines[1]))
        assert sorted(options) == [1, 2, 3, 4], text
        if asked:  # look-up: the digit is the number of the option the question names
            assert options[answer] == asked.group(1), text
        else:  # knowledge: the number of the option that holds the named entity's fact
            assert facts_listed(world, lines[0], options) == [options[answer]], text
        seen.add(bool(asked))
        labelled = (batch["labels"][row] != -100).nonzero().flatten().tolist()
        assert labelled == [n - 1] and int(batch["labels"][row, n - 1]) == int(real[-1]), text
        assert torch.equal(every["labels"][row, :n], real) and bool((every["labels"][row, n:] == -100).all())
        row_logits = logits[row, :n]
        per_row_answer.append(torch.nn.functional.cross_entropy(row_logits[-2:-1], real[-1:]))
        per_row_all.append(torch.nn.functional.cross_entropy(row_logits[:-1], real[1:], reduction="sum"))
        tokens += n - 1
    assert seen == {True, False}  # both kinds were drawn
    # The same sums in another order: float32 rounding only.
    torch.testing.assert_close(answer_loss, torch.stack(per_row_answer).mean())
    torch.testing.assert_close(all_loss, torch.stack(per_row_all).sum() / tokens)
