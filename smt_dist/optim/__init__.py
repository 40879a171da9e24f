"""Optimizers for SMT's block parameters."""

from smt_dist.optim.block_sharded import BlockShardedAdamW

__all__ = ["BlockShardedAdamW"]
