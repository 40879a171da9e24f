"""``preprocess_smt``: the warm-up, run before peft builds the model, as LoRA-GA's is.

peft, the Trainer and TRL build the optimizer (and the DeepSpeed engine) from the model's
trainable parameters before any callback runs, so SMT's selection must exist before
``get_peft_model``: ``preprocess_smt`` warms up on the plain model (under ZeRO-3 with DeepSpeed's
own gathering, as ``smt_dist.deepspeed.prepare`` does), and writes the blocks and a fingerprint of
the base into the config, which ``get_peft_model`` (or ``SFTTrainer(peft_config=...)``) then uses.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from torch import nn

from smt_dist.files.adapter import base_fingerprint
from smt_dist.integrations.peft.config import SMTPeftConfig
from smt_dist.integrations.prepare import warm_up_and_choose


def preprocess_smt(
    model: nn.Module,
    config: SMTPeftConfig,
    batches: Iterable[Any],
    *,
    loss_fn: Any = None,
    ds_config: dict[str, Any] | str | os.PathLike | None = None,
) -> SMTPeftConfig:
    """Warm up on ``batches`` (dicts with ``labels``, or any batch with ``loss_fn(model, batch)``),
    select the blocks and record them in ``config``; returns ``config``.

    Call on every rank of a data-parallel job (the scores are summed over ranks and every rank
    checks it chose the same blocks) with the plain model, before ``get_peft_model``.
    ``ds_config``: the DeepSpeed config for a model ZeRO-3 partitioned at load (default: the one
    transformers loaded it under).
    """
    if getattr(model, "peft_config", None):
        raise ValueError("preprocess_smt needs the plain model; call it before get_peft_model.")
    smt_config = config.smt_config()
    selection = warm_up_and_choose(model, batches, smt_config, config=ds_config, loss_fn=loss_fn)
    config.set_selection(selection)
    config.base_fingerprint = base_fingerprint(model, sorted(selection.blocks))
    return config
