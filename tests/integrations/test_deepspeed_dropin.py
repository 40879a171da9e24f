"""The drop-in recipe: an existing deepspeed.initialize script swapping in SMT, on 2 gloo ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import lm_batches, tiny_causal_lm
from distributed_utils import run_on_ranks
from parity import LR, PARITY, STEPS, blocks_of, micro_batches, reference, smt_model

import smt_dist.deepspeed as smt_deepspeed
from smt_dist import SMTConfig, SparseLinear
from smt_dist.optim import BlockShardedAdamW


def stage0_config_file(path, accumulation: int) -> str:
    """A user's ZeRO-0 JSON, passed as a path, with no ``gradient_clipping`` key (DeepSpeed's
    default would then clip each rank's unaveraged gradient at 1.0 unless ``initialize`` stops it)."""
    config = {
        "train_micro_batch_size_per_gpu": 4 // 2 // accumulation,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": {"stage": 0},
    }
    Path(path).write_text(json.dumps(config))
    return str(path)


def _dropin_on_rank(rank, world, accumulation, clip, config_path, out_dir):
    model = smt_model()
    optimizer = BlockShardedAdamW(blocks_of(model), lr=LR, weight_decay=0.1, max_grad_norm=clip)
    engine, optimizer, _, _ = smt_deepspeed.initialize(model=model, optimizer=optimizer, config=config_path)
    assert engine.enable_backward_allreduce is False and not engine.gradient_clipping()
    for step in range(STEPS):
        for batch in micro_batches(step, rank, world, accumulation):
            loss = engine(**batch).loss
            engine.backward(loss)  # the engine scales by 1/accumulation itself
            engine.step()
    torch.save([p.detach() for p in blocks_of(model)], f"{out_dir}/rank{rank}.pt")


# clip 0.05 is below every step's global gradient norm here, so clipping acts on every step
@pytest.mark.parametrize(("accumulation", "clip"), [(1, None), (2, None), (2, 0.05)])
def test_stage0_dropin_matches_one_process(tmp_path, accumulation, clip):
    """BlockShardedAdamW through initialize (config path, no clipping key) on 2 ranks equals one
    process of torch AdamW over the full batch, with global-norm clipping where asked."""
    config_path = stage0_config_file(tmp_path / "ds_config.json", accumulation)
    run_on_ranks(_dropin_on_rank, 2, accumulation, clip, config_path, str(tmp_path))
    expected = reference(accumulation, clip)
    for rank in range(2):
        for got, want in zip(torch.load(tmp_path / f"rank{rank}.pt"), expected, strict=True):
            torch.testing.assert_close(got, want, **PARITY)


def _prepare_on_rank(rank, world, out_dir):
    model = tiny_causal_lm("llama")
    config = SMTConfig(block_size=16, num_blocks=5, warmup_steps=2)
    model = smt_deepspeed.prepare(model, lm_batches(2, seed=rank), config)
    optimizer = torch.optim.AdamW(blocks_of(model), lr=LR)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
    }
    engine, _, _, _ = smt_deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    loss = engine(**lm_batches(1, seed=9)[0]).loss
    engine.backward(loss)
    engine.step()
    counts = {name: m.num_blocks for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    torch.save(counts, f"{out_dir}/rank{rank}.pt")


def test_prepare_then_zero2_with_a_client_adamw(tmp_path):
    run_on_ranks(_prepare_on_rank, 2, str(tmp_path))
    counts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert counts[0] == counts[1] and sum(counts[0].values()) == 5


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"zero_optimization": {"stage": 2}},
            r"zero_optimization.stage=2 \(ZeRO partitions the blocks itself\)",
        ),
        ({"gradient_clipping": 1.0}, "gradient_clipping>0 .pass max_grad_norm to BlockShardedAdamW"),
        ({"bf16": {"enabled": True}}, "bf16 enabled"),
    ],
)
def test_sharded_optimizer_refuses_incompatible_configs(config, message):
    model = smt_model()
    with pytest.raises(ValueError, match=message):
        smt_deepspeed.initialize(
            model=model,
            optimizer=BlockShardedAdamW(blocks_of(model)),
            config={"train_batch_size": 4, **config},
        )
