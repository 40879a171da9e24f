"""SMT as a peft method: importing this package registers it.

    config = SMTPeftConfig(block_size=256, ratio=0.01, target_modules=["q_proj", "k_proj", "v_proj"])
    preprocess_smt(model, config, warmup_batches)      # the warm-up fills config.block_pattern
    model = get_peft_model(model, config)              # or SFTTrainer(..., peft_config=config)

peft 0.21 accepts new methods only under names of its own ``PeftType`` enum, so the registration
writes ``"SMT"`` into the three tables peft looks methods up in (``peft.mapping``), the way its
own ``register_peft_method`` does. That is peft's private ground: the tables are checked to look
as expected first, and peft versions outside the tested range are refused in one sentence.
"""

from __future__ import annotations

import peft
from peft import mapping

from smt_dist.integrations.peft.config import PEFT_TYPE, SMTPeftConfig
from smt_dist.integrations.peft.convert import from_smt_adapter, to_smt_adapter
from smt_dist.integrations.peft.layer import SMTBlocks, SMTLayer
from smt_dist.integrations.peft.preprocess import preprocess_smt
from smt_dist.integrations.peft.tuner import SMTTuner

TESTED_PEFT = ((0, 21), (0, 22))
"""peft versions this registration is tested with: at least the first, below the second."""

_TABLES = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")


def _register() -> None:
    version = tuple(int(part) for part in peft.__version__.split(".")[:2] if part.isdigit())
    low, high = TESTED_PEFT
    tables = [getattr(mapping, name, None) for name in _TABLES]
    if not low <= version < high or not all(isinstance(t, dict) and "LORA" in t for t in tables):
        raise ImportError(
            f"smt_dist's peft method is tested with peft {low[0]}.{low[1]}.x and registers itself in "
            f"peft's internal tables, which peft {peft.__version__} does not have as expected; install "
            f"'peft>={low[0]}.{low[1]},<{high[0]}.{high[1]}' (pip install 'smt_dist[peft]')."
        )
    configs, tuners, prefixes = tables
    if configs.get(PEFT_TYPE) not in (None, SMTPeftConfig):
        raise ImportError(f"Another peft method is registered as '{PEFT_TYPE}'; smt_dist cannot register.")
    configs[PEFT_TYPE] = SMTPeftConfig
    tuners[PEFT_TYPE] = SMTTuner
    prefixes[PEFT_TYPE] = SMTTuner.prefix


_register()

__all__ = [
    "SMTBlocks",
    "SMTLayer",
    "SMTPeftConfig",
    "SMTTuner",
    "from_smt_adapter",
    "preprocess_smt",
    "to_smt_adapter",
]
