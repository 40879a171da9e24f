"""Top-k selection against a brute-force sort, ties, caps and budget errors."""

from __future__ import annotations

import pytest
import torch

from smt_dist import SMTConfig, select_blocks


def random_scores(seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"l0.q_proj": (4, 4), "l0.v_proj": (2, 4), "l1.v_proj": (2, 4), "l1.up_proj": (8, 4)}
    return {name: torch.rand(shape, generator=generator) for name, shape in shapes.items()}


def as_set(selection):
    return {(name, int(r), int(c)) for name, index in selection.blocks.items() for r, c in index}


def brute_force_top(scores, k, allowed=lambda name: True):
    entries = [
        (float(score[r, c]), name, r, c)
        for name, score in scores.items()
        if allowed(name)
        for r in range(score.shape[0])
        for c in range(score.shape[1])
    ]
    return {(name, r, c) for _, name, r, c in sorted(entries, key=lambda e: -e[0])[:k]}


@pytest.mark.parametrize("k", [1, 5, 17, 64])
def test_top_k_matches_brute_force(k):
    scores = random_scores(k)
    selection = select_blocks(scores, SMTConfig(block_size=8, num_blocks=k))
    assert selection.num_blocks == k
    assert as_set(selection) == brute_force_top(scores, k)


def test_ties_break_by_module_name_then_row_major_and_repeat():
    scores = {name: torch.ones(2, 2) for name in ("b.v_proj", "a.q_proj")}
    config = SMTConfig(block_size=8, num_blocks=3)
    first = select_blocks(scores, config)
    assert as_set(first) == {("a.q_proj", 0, 0), ("a.q_proj", 0, 1), ("a.q_proj", 1, 0)}
    assert (
        select_blocks({k: v.clone() for k, v in reversed(scores.items())}, config).digest() == first.digest()
    )


def test_caps_limit_a_group_and_fill_from_the_rest():
    scores = random_scores(3)
    scores["l1.up_proj"] += 10.0  # MLP would take every block without a cap
    config = SMTConfig(block_size=8, num_blocks=10, max_mlp_fraction=0.3)
    chosen = as_set(select_blocks(scores, config))
    mlp = {entry for entry in chosen if entry[0].endswith("up_proj")}
    assert len(mlp) == 3 and len(chosen) == 10
    assert mlp == brute_force_top(scores, 3, lambda n: n.endswith("up_proj"))
    assert chosen - mlp == brute_force_top(scores, 7, lambda n: not n.endswith("up_proj"))


def test_ratio_budget_counts_model_parameters():
    selection = select_blocks(random_scores(), SMTConfig(block_size=8, ratio=0.01), total_params=64 * 1000)
    assert selection.num_blocks == 10  # 1% of 64,000 parameters is 640 = 10 blocks of 8x8


@pytest.mark.parametrize(
    ("config", "total", "message"),
    [
        (SMTConfig(block_size=8, num_blocks=65), None, "budget of 65 blocks exceeds the 64 blocks of the 4"),
        (SMTConfig(block_size=8, ratio=0.001), 10_000, "less than one block of 8x8=64"),
        (SMTConfig(block_size=8, ratio=0.1), None, "needs the model's total parameter count"),
        (
            SMTConfig(block_size=8, num_blocks=20, max_mlp_fraction=0.1, max_attention_fraction=0.1),
            None,
            "caps",
        ),
    ],
)
def test_bad_budgets_are_clear_errors(config, total, message):
    with pytest.raises(ValueError, match=message):
        select_blocks(random_scores(), config, total_params=total)


def test_nan_scores_and_no_scores_are_clear_errors():
    scores = random_scores()
    scores["l0.v_proj"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="Scores for 'l0.v_proj' contain NaN"):
        select_blocks(scores, SMTConfig(block_size=8, num_blocks=2))
    with pytest.raises(ValueError, match="no target module matched"):
        select_blocks({}, SMTConfig(block_size=8, num_blocks=2))


@pytest.mark.parametrize(("attention", "mlp"), [(29, 71), (7, 3), (0, 5)])
def test_authors_recipe_selects_exactly_its_two_budgets(attention, mlp):
    """Their separate attention and MLP budgets, as a total and two caps, are met exactly."""
    config = SMTConfig.authors_recipe(attention_blocks=attention, mlp_blocks=mlp, block_size=16)
    generator = torch.Generator().manual_seed(3)
    names = [f"model.layers.0.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj")]
    names += [f"model.layers.0.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
    # MLP scores are larger, so without the caps the MLP would take every block
    scores = {
        name: torch.rand(8, 8, generator=generator) + (1.0 if ".mlp." in name else 0.0) for name in names
    }
    selection = select_blocks(scores, config)
    counts = {"attn": 0, "mlp": 0}
    for name, index in selection.blocks.items():
        counts["mlp" if ".mlp." in name else "attn"] += len(index)
    assert counts == {"attn": attention, "mlp": mlp}
    assert config.score == "abs_mean" and "o_proj" not in config.target_modules


def _capped_reference(scores, budget, cap):
    """The same rule written as a loop: walk blocks by score (ties: module name, row-major) and
    skip any block whose (module, row-block) already holds ``cap``."""
    candidates = [
        (-float(score[r, c]), name, r, c)
        for name, score in sorted(scores.items())
        for r in range(score.shape[0])
        for c in range(score.shape[1])
    ]
    order = sorted(range(len(candidates)), key=lambda i: (candidates[i][0], i))
    taken, used = {}, {}
    for i in order:
        _, name, r, c = candidates[i]
        if used.get((name, r), 0) < cap:
            used[(name, r)] = used.get((name, r), 0) + 1
            taken.setdefault(name, []).append([r, c])
            if sum(map(len, taken.values())) == budget:
                break
    return {name: sorted(map(tuple, blocks)) for name, blocks in taken.items()}


@pytest.mark.parametrize("cap", [1, 2])
def test_row_cap_keeps_the_top_blocks_allowed_in_each_row(cap):
    generator = torch.Generator().manual_seed(cap)
    # rows of very different strength, as the warm-up's outer-product-like scores have
    scores = {
        "a.q_proj": torch.rand(4, 6, generator=generator) * torch.tensor([[50.0], [1.0], [1.0], [20.0]]),
        "a.v_proj": torch.rand(2, 6, generator=generator) * 10,
    }
    config = SMTConfig(block_size=16, num_blocks=5, max_blocks_per_row=cap)
    selection = select_blocks(scores, config)
    got = {name: sorted(map(tuple, index.tolist())) for name, index in selection.blocks.items()}
    assert got == _capped_reference(scores, 5, cap)

    def fullest_row(selection):
        rows = [(name, r) for name, index in selection.blocks.items() for r, _ in index.tolist()]
        return max(rows.count(row) for row in rows)

    assert fullest_row(selection) <= cap
    assert fullest_row(select_blocks(scores, SMTConfig(block_size=16, num_blocks=5))) > cap  # it bit


def test_row_cap_that_leaves_too_few_blocks_says_so():
    scores = {"a.q_proj": torch.rand(2, 4)}
    with pytest.raises(
        ValueError, match="max_blocks_per_row=1 leaves only 2 eligible blocks for a budget of 3"
    ):
        select_blocks(scores, SMTConfig(block_size=16, num_blocks=3, max_blocks_per_row=1))
