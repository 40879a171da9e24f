"""SMT inside transformers.Trainer: BlockShardedAdamW against torch.optim.AdamW, same Trainer."""

from __future__ import annotations

import torch
from conftest import lm_batches
from parity import blocks_of, smt_model
from transformers import Trainer, TrainingArguments

from smt_dist.optim import BlockShardedAdamW


def run_trainer(tmp_path, make_optimizer):
    model = smt_model()
    examples = [{k: v[0] for k, v in batch.items()} for batch in lm_batches(12, batch=1, seq=12, seed=5)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        weight_decay=0.1,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    optimizer = make_optimizer(blocks_of(model))
    trainer = Trainer(model=model, args=args, train_dataset=examples, optimizers=(optimizer, None))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return [p.detach().clone() for p in blocks_of(model)], losses


def test_trainer_with_block_sharded_adamw_matches_torch_adamw(tmp_path):
    start = [p.detach().clone() for p in blocks_of(smt_model())]
    ours, our_losses = run_trainer(
        tmp_path / "ours", lambda p: BlockShardedAdamW(p, lr=1e-3, weight_decay=0.1)
    )
    theirs, their_losses = run_trainer(
        tmp_path / "torch", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, fused=True)
    )
    assert len(our_losses) == 6 and our_losses == their_losses
    for got, want, before in zip(ours, theirs, start, strict=True):
        assert torch.equal(got, want)  # one process: the same fused AdamW kernel, bit for bit
        assert not torch.equal(got, before)
