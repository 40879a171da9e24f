"""A small SMT training problem and its single-process torch.optim.AdamW reference.

Shared by the parity tests of every distributed path: each runs the same steps on 2 ranks with
half of each batch and must land where one process lands with the full batch.
"""

from __future__ import annotations

import torch
from conftest import lm_batches, tiny_causal_lm

from smt_dist import BlockSelection, SMTConfig, apply_smt

# Averaging two half-batch gradients differs from the full-batch gradient in the last bits of
# fp32; through 10 AdamW steps at lr 1e-3 that stays far below the 1e-6 the parity asks for.
PARITY = dict(rtol=0, atol=1e-6)
LR, STEPS = 1e-3, 10
# 7 blocks: an odd count, so the two ranks own 4 and 3 and the exchange needs padding.
SELECTION = {
    "model.layers.0.self_attn.v_proj": [[0, 1], [1, 3]],
    "model.layers.0.self_attn.q_proj": [[2, 2]],
    "model.layers.1.self_attn.o_proj": [[0, 0], [3, 1], [3, 2]],
    "model.layers.1.self_attn.k_proj": [[1, 0]],
}


def smt_model() -> torch.nn.Module:
    config = SMTConfig(block_size=16, num_blocks=7)
    selection = BlockSelection(block_size=16, blocks={k: torch.tensor(v) for k, v in SELECTION.items()})
    model = apply_smt(tiny_causal_lm("llama"), selection, config)
    with torch.no_grad():  # start from non-zero blocks so weight decay has something to do
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(3))
    return model


def blocks_of(model):
    return [p for p in model.parameters() if p.requires_grad]


def micro_batches(step: int, rank: int | None, world: int, accumulation: int):
    """Step ``step``'s micro-batches for one rank (``rank=None``: the full batch, one process)."""
    full = lm_batches(1, batch=4, seq=12, seed=100 + step)[0]
    rows = range(4) if rank is None else range(rank * 4 // world, (rank + 1) * 4 // world)
    rows = list(rows)
    size = len(rows) // accumulation
    return [{k: v[rows[i * size : (i + 1) * size]] for k, v in full.items()} for i in range(accumulation)]


def train(model, optimizer, *, rank, world, accumulation, clip, steps=range(STEPS)):
    for step in steps:
        for batch in micro_batches(step, rank, world, accumulation):
            (model(**batch).loss / accumulation).backward()
        if clip and isinstance(optimizer, torch.optim.AdamW):
            torch.nn.utils.clip_grad_norm_(blocks_of(model), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def reference(accumulation: int, clip: float | None, steps=STEPS) -> list[torch.Tensor]:
    model = smt_model()
    optimizer = torch.optim.AdamW(blocks_of(model), lr=LR, weight_decay=0.1)
    train(model, optimizer, rank=None, world=1, accumulation=accumulation, clip=clip, steps=range(steps))
    return [p.detach().clone() for p in blocks_of(model)]


def load_blocks(model, tensors) -> None:
    """Copy saved block values into a model's block parameters."""
    with torch.no_grad():
        for p, q in zip(blocks_of(model), tensors, strict=True):
            p.copy_(q)
