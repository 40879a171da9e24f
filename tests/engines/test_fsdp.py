"""FSDP2 over an SMT model on 2 gloo ranks against one process with torch.optim.AdamW."""

from __future__ import annotations

import pytest
import torch
from distributed_utils import run_on_ranks, unsharded
from parity import LR, PARITY, STEPS, blocks_of, micro_batches, reference, smt_model

from smt_dist.core.surgery import decoder_layers
from smt_dist.engines.fsdp import shard_model


def _fsdp_on_rank(rank, world, cpu_offload, clip, out_dir):
    model = shard_model(smt_model(), cpu_offload=cpu_offload)
    blocks = blocks_of(model)
    # Whole blocks per rank: the local shard of each [nb, l, l] parameter is [k, l, l].
    assert all(p.to_local().shape[1:] == (16, 16) for p in blocks)
    optimizer = torch.optim.AdamW(blocks, lr=LR, weight_decay=0.1)
    for step in range(STEPS):
        for batch in micro_batches(step, rank, world, 1):
            model(**batch).loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(blocks, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    frozen_grads = [p.grad for p in model.parameters() if not p.requires_grad]
    assert all(g is None for g in frozen_grads)
    with unsharded(model):
        torch.save([p.detach().clone() for p in blocks_of(model)], f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize(("cpu_offload", "clip"), [(False, None), (True, 0.05)])
def test_fsdp2_matches_one_process(tmp_path, cpu_offload, clip):
    run_on_ranks(_fsdp_on_rank, 2, cpu_offload, clip, str(tmp_path))
    expected = reference(1, clip)
    for rank in range(2):
        for got, want in zip(torch.load(tmp_path / f"rank{rank}.pt"), expected, strict=True):
            torch.testing.assert_close(got, want, **PARITY)


def test_decoder_layers_are_found_or_a_clear_error():
    assert len(decoder_layers(smt_model())) == 2
    with pytest.raises(ValueError, match="Found no decoder layers"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))
