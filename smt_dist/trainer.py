"""``smt_dist.trainer``: SMT in the Hugging Face Trainer, by its documented name.

    smt_dist.trainer.prepare_trainer(trainer, SMTConfig(block_size=256, ratio=0.01))

The code lives in ``smt_dist.integrations.transformers``.
"""

from smt_dist.integrations.transformers import ADAPTER_DIR, SMTCallback, prepare_trainer

__all__ = ["ADAPTER_DIR", "SMTCallback", "prepare_trainer"]
