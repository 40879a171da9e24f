"""SMT in the Hugging Face Trainer: one call before ``trainer.train()``.

    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, ...)
    smt_dist.trainer.prepare_trainer(trainer, SMTConfig(block_size=256, ratio=0.01))
    trainer.train()

``prepare_trainer`` runs the warm-up on every rank from the Trainer's own training dataloader
(each rank its own shard of it), under the Trainer's DeepSpeed config (a ZeRO-3 model is
partitioned as it loaded and stays so), converts the model, and adds ``SMTCallback``, which writes
the adapter next to each of the Trainer's checkpoints (``checkpoint-N/smt_adapter``) and at the end
(``<output_dir>/smt_adapter``). The Trainer then builds its optimizer (and its DeepSpeed engine)
over the blocks alone, and its own ``save_model`` writes merged weights (``smt_dist.integrations.merge_on_save``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from smt_dist.core.config import SMTConfig
from smt_dist.core.surgery import no_backward_below_blocks
from smt_dist.files.adapter import save_smt_adapter
from smt_dist.integrations.prepare import prepare

ADAPTER_DIR = "smt_adapter"


class SMTCallback(TrainerCallback):
    """Writes the SMT adapter with every Trainer checkpoint and at the end of training.

    Runs on every rank: under ZeRO-3 the blocks are gathered (only they are), and rank 0 writes.
    """

    def __init__(self, model: torch.nn.Module, config: SMTConfig) -> None:
        self.model = model
        self.config = config

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        # The Trainer has just enabled checkpointing, and with it transformers' input-gradient hook.
        no_backward_below_blocks(self.model)

    def on_save(self, args, state, control, **kwargs) -> None:
        save_smt_adapter(
            self.model,
            Path(args.output_dir) / f"checkpoint-{state.global_step}" / ADAPTER_DIR,
            config=self.config,
        )

    def on_train_end(self, args, state, control, **kwargs) -> None:
        save_smt_adapter(self.model, Path(args.output_dir) / ADAPTER_DIR, config=self.config)


def prepare_trainer(
    trainer: Any, config: SMTConfig, *, loss_fn: Any = None, merge_on_save: bool = True
) -> Any:
    """Warm up, select and convert the Trainer's model in place; returns the trainer.

    Call on every rank after building the Trainer and before ``trainer.train()``.
    """
    model, device = trainer.model, trainer.args.device
    ds_config = trainer.args.hf_deepspeed_config.config if trainer.args.deepspeed else None
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    if not partitioned:
        model.to(device)
    batches = (
        {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        for batch in trainer.get_train_dataloader()
    )
    prepare(model, batches, config, config=ds_config, loss_fn=loss_fn, merge_on_save=merge_on_save)
    trainer.add_callback(SMTCallback(model, config))
    return trainer
