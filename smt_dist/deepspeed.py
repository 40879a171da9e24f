"""``smt_dist.deepspeed``: SMT in an existing DeepSpeed script, two changed lines.

    model = smt_dist.deepspeed.prepare(model, warmup_batches, SMTConfig(...), config=ds_config)
    engine, optimizer, _, scheduler = smt_dist.deepspeed.initialize(model=model, ..., config=ds_config)

The names live where their layer is: ``prepare`` in ``smt_dist.integrations.prepare`` (it works
for any engine), ``initialize`` and the config policy in ``smt_dist.engines.deepspeed``.
"""

from smt_dist.engines.deepspeed import initialize
from smt_dist.integrations.prepare import prepare

__all__ = ["initialize", "prepare"]
