"""The warm-up on models partitioned as they load (ZeRO-3, FSDP2) against the unpartitioned warm-up.

Two gloo ranks load a saved tiny Llama partitioned (ZeRO-3 through ``HfDeepSpeedConfig``, FSDP2
through ``load_sharded``), warm up on half of the batches each, and must reach the scores and the
selection of one process warming up the whole model on all batches, without any rank ever
holding a whole weight's gradient.
"""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batches, tiny_causal_lm
from counting import WeightShapedProducts
from distributed_utils import run_on_ranks

from smt_dist import SMTConfig, collect_block_scores, find_targets, select_blocks
from smt_dist.integrations.prepare import choose_blocks

# Each rank sums its own micro-batches, then one all-reduce sums the ranks: the same fp32 terms in
# another order than one process, and the partitioned weights are bitwise the loaded ones. 1e-5
# relative leaves room for that reordering (measured: below 5e-7).
TOL = dict(rtol=1e-5, atol=1e-8)
BATCHES = dict(batch=2, seq=12)  # 24 tokens: no weight of the tiny Llama has a dimension of 24


def smt_config(score: str, steps: int) -> SMTConfig:
    return SMTConfig(block_size=16, num_blocks=6, warmup_steps=steps, score=score, target_modules=("*_proj",))


def _warm_up(model, rank, score, out_dir, after_backward=None):
    shapes = {
        tuple(t.weight.ds_shape if hasattr(t.weight, "ds_shape") else t.weight.shape)
        for t in find_targets(model, smt_config(score, 2)).values()
    }
    batches = lm_batches(4, **BATCHES)[rank * 2 : rank * 2 + 2]
    with WeightShapedProducts(shapes) as products:
        selection, scores = choose_blocks(model, batches, smt_config(score, 2), after_backward=after_backward)
    assert products.seen == [], products.seen
    assert all(p.grad is None for p in model.parameters())
    torch.save({"scores": scores, "digest": selection.digest()}, f"{out_dir}/rank{rank}.pt")


def _zero3_on_rank(rank, world, base, score, out_dir):
    from transformers import AutoModelForCausalLM

    import smt_dist.engines.deepspeed as smt_deepspeed

    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}}
    keep_alive = smt_deepspeed.partitioned_loading(config)
    model = AutoModelForCausalLM.from_pretrained(base)
    # Partitioned as it loaded: no rank holds any whole weight, each holds half of every one.
    assert all(p.numel() == 0 and p.ds_tensor.numel() * world >= p.ds_numel for p in model.parameters())
    with smt_deepspeed.warmup_engine(model, config) as after_backward:
        _warm_up(model, rank, score, out_dir, after_backward)
    del keep_alive


def _fsdp_on_rank(rank, world, base, score, out_dir):
    from smt_dist.engines.fsdp import load_sharded

    model = load_sharded(base, dtype=torch.float32, device=torch.device("cpu"))
    assert all(p.to_local().shape[0] == p.shape[0] // world for p in model.parameters())
    _warm_up(model, rank, score, out_dir)


@pytest.mark.parametrize("score", ["mean_abs", "abs_mean"])
@pytest.mark.parametrize("engine", ["zero3", "fsdp"])
def test_partitioned_warmup_equals_the_unpartitioned_one(tmp_path, engine, score):
    base = tmp_path / "base"
    tiny_causal_lm("llama").save_pretrained(base, safe_serialization=True)
    run_on_ranks(_zero3_on_rank if engine == "zero3" else _fsdp_on_rank, 2, str(base), score, str(tmp_path))
    config = smt_config(score, 4)
    reference = collect_block_scores(tiny_causal_lm("llama"), lm_batches(4, **BATCHES), config)
    digest = select_blocks(reference, config).digest()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["digest"] == digest
        for name, expected in reference.items():
            torch.testing.assert_close(result["scores"][name], expected, **TOL)
