"""Warm-up scoring against dense per-block references computed with explicit loops."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import lm_batches, tiny_causal_lm
from counting import WeightShapedProducts

from smt_dist import SMTConfig, collect_block_scores, find_targets, select_blocks
from smt_dist.core.scoring import BlockScoreProbes, finalize_scores

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


@pytest.mark.parametrize("score", ["mean_abs", "abs_mean"])
def test_warmup_creates_no_weight_gradient_and_restores_flags(score):
    model = tiny_causal_lm("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    config = SMTConfig(block_size=16, num_blocks=2, warmup_steps=2, score=score, target_modules=("*_proj",))
    targets = find_targets(model, config)
    trainable_during = []
    for linear in targets.values():
        linear.register_forward_hook(
            lambda *_: trainable_during.append(sum(p.requires_grad for p in model.parameters()))
        )
    # A dense weight gradient would be a matrix product shaped like its weight; 2 x 12 tokens
    # match no weight dimension, so only such a gradient could produce one.
    shapes = {tuple(t.weight.shape) for t in targets.values()}
    with WeightShapedProducts(shapes) as products:
        collect_block_scores(model, lm_batches(2, batch=2, seq=12), config)
    assert products.seen == []
    assert trainable_during and max(trainable_during) == 0
    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_the_weight_shape_check_can_fail():
    """The counting mode above sees a dense weight gradient when one is computed."""
    model = tiny_causal_lm("llama")
    shapes = {tuple(model.model.layers[0].self_attn.q_proj.weight.shape)}
    with WeightShapedProducts(shapes) as products:
        model(**lm_batches(1, batch=2, seq=12)[0]).loss.backward()
    assert products.seen


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` (per output feature) in backward."""

    @staticmethod
    def forward(ctx, y, scale):
        ctx.scale = scale
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


PLANTED = [
    ("model.layers.0.self_attn.v_proj", 1, 2),
    ("model.layers.1.self_attn.q_proj", 3, 0),
    ("model.layers.1.mlp.down_proj", 0, 7),
]


@pytest.mark.parametrize("score", ["mean_abs", "abs_mean"])
def test_scoring_and_selection_find_planted_blocks(score):
    """Plant ``G[r, c]`` a million times larger and nothing else: the warm-up must find it.

    ``G = dY^T X``. The input's column-block c is scaled by 1000 and the weight's columns divided
    by 1000 (the output is unchanged); the output gradient's row-block r is scaled by 1000 where
    the probe reads it and unscaled before it flows on. Nothing upstream or downstream changes,
    so block (r, c) grows 10^6-fold and its row and column neighbours 10^3-fold.
    """
    model = tiny_causal_lm("llama")
    l, s = 16, 1000.0
    config = SMTConfig(
        block_size=l, num_blocks=len(PLANTED), warmup_steps=2, score=score, target_modules=("*_proj",)
    )
    modules = dict(model.named_modules())
    scales = {}
    for name, row, col in PLANTED:
        module = modules[name]
        x_scale = torch.ones(module.in_features)
        x_scale[col * l : (col + 1) * l] = s
        g_scale = torch.ones(module.out_features)
        g_scale[row * l : (row + 1) * l] = s
        with torch.no_grad():
            module.weight.div_(x_scale)
        module.register_forward_pre_hook(lambda m, args, x_scale=x_scale: (args[0] * x_scale,))
        module.register_forward_hook(lambda m, args, out, g=g_scale: _ScaleGrad.apply(out, 1 / g))
        scales[name] = g_scale
    targets = find_targets(model, config)
    with BlockScoreProbes(model, targets, block_size=l, score=score) as probes:
        for name, g_scale in scales.items():  # after the probe's hook: runs first in backward
            modules[name].register_forward_hook(lambda m, args, out, g=g_scale: _ScaleGrad.apply(out, g))
        for batch in lm_batches(2):
            model(**batch).loss.backward()
    selection = select_blocks(finalize_scores(probes.sums, score, l), config)
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
