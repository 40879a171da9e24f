"""``smt_dist.peft``: SMT as a peft method, by its documented names. Importing it registers the
method with peft (``peft_type`` ``"SMT"``).

    config = SMTPeftConfig(block_size=256, ratio=0.01, target_modules=["q_proj", "k_proj", "v_proj"])
    preprocess_smt(model, config, warmup_batches)
    model = peft.get_peft_model(model, config)

The code lives in ``smt_dist.integrations.peft``.
"""

from smt_dist.integrations.peft import SMTPeftConfig, from_smt_adapter, preprocess_smt, to_smt_adapter

__all__ = ["SMTPeftConfig", "from_smt_adapter", "preprocess_smt", "to_smt_adapter"]
