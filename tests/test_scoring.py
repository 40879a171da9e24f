"""Warm-up scoring against dense per-block references computed with explicit loops."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import lm_batches, tiny_causal_lm

from smt_dist import SMTConfig, collect_block_scores, find_targets, select_blocks

# Scores are sums of a few fp32 means; the two sides reduce in different orders: 1e-5 relative.
TOL = dict(rtol=1e-5, atol=1e-8)


def dense_grads_per_step(model, batches, names):
    """Per-micro-batch dense gradients of the named weights, by ordinary autograd."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    steps = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        steps.append({name: modules[name].weight.grad.clone() for name in names})
    return steps


def loop_block_reduce(grad, l, fn):
    rows, cols = grad.shape[0] // l, grad.shape[1] // l
    return torch.tensor(
        [[fn(grad[r * l : (r + 1) * l, c * l : (c + 1) * l]) for c in range(cols)] for r in range(rows)]
    )


@pytest.mark.parametrize("score", ["mean_abs", "abs_mean"])
def test_scores_match_dense_reference(score):
    model = tiny_causal_lm("llama")
    config = SMTConfig(block_size=16, num_blocks=4, warmup_steps=3, score=score, target_modules=("*_proj",))
    batches = lm_batches(3)
    names = sorted(find_targets(model, config))
    steps = dense_grads_per_step(model, batches, names)
    scores = collect_block_scores(model, batches, config)
    assert sorted(scores) == names
    for name in names:
        if score == "mean_abs":
            expected = sum(loop_block_reduce(step[name], 16, lambda b: b.abs().mean()) for step in steps)
        else:
            total = sum(step[name] for step in steps)
            expected = loop_block_reduce(total, 16, lambda b: b.mean().abs())
        torch.testing.assert_close(scores[name], expected, **TOL)


def test_warmup_keeps_no_gradient_and_restores_flags():
    model = tiny_causal_lm("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    config = SMTConfig(block_size=16, num_blocks=2, warmup_steps=2)
    seen = []
    for linear in find_targets(model, config).values():
        # Runs before the collector's hook: only this weight's own fresh gradient may be alive,
        # never an earlier layer's.
        linear.weight.register_post_accumulate_grad_hook(
            lambda _: seen.append(sum(p.grad is not None for p in model.parameters()))
        )
    collect_block_scores(model, lm_batches(2), config)
    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert seen and max(seen) == 1


PLANTED = [
    ("model.layers.0.self_attn.v_proj", 1, 2),
    ("model.layers.1.self_attn.q_proj", 3, 0),
    ("model.layers.1.mlp.down_proj", 0, 7),
]


@pytest.mark.parametrize("score", ["mean_abs", "abs_mean"])
def test_scoring_and_selection_find_planted_blocks(score):
    model = tiny_causal_lm("llama")
    l = 16
    config = SMTConfig(
        block_size=l, num_blocks=len(PLANTED), warmup_steps=2, score=score, target_modules=("*_proj",)
    )
    modules = dict(model.named_modules())
    for name, row, col in PLANTED:
        weight = modules[name].weight
        plant = torch.zeros_like(weight)
        plant[row * l : (row + 1) * l, col * l : (col + 1) * l] = 100.0
        weight.register_hook(lambda grad, plant=plant: grad + plant)
    selection = select_blocks(collect_block_scores(model, lm_batches(2), config), config)
    found = sorted((name, *map(int, rc)) for name, index in selection.blocks.items() for rc in index)
    assert found == sorted(PLANTED)


def test_too_few_warmup_batches_is_a_clear_error():
    config = SMTConfig(block_size=16, num_blocks=2, warmup_steps=5)
    with pytest.raises(ValueError, match="needs 5 micro-batches but the data gave only 2"):
        collect_block_scores(tiny_causal_lm(), lm_batches(2), config)


def test_no_target_matched_is_a_clear_error():
    config = SMTConfig(block_size=16, num_blocks=2, target_modules=("query",))
    with pytest.raises(ValueError, match=r"No nn.Linear matches target_modules \['query'\]"):
        collect_block_scores(tiny_causal_lm(), lm_batches(2), config)


def test_block_size_not_dividing_a_target_is_a_clear_error():
    config = SMTConfig(block_size=48, num_blocks=2)
    with pytest.raises(ValueError, match="Module 'model.layers.0.self_attn.q_proj' has out_features=64"):
        collect_block_scores(tiny_causal_lm(), lm_batches(2), config)
