"""BlockShardedAdamW on 2 gloo ranks against one process with torch.optim.AdamW on the full batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_utils import run_on_ranks
from parity import (
    LR,
    PARITY,
    SELECTION,
    STEPS,
    blocks_of,
    load_blocks,
    micro_batches,
    reference,
    smt_model,
    train,
)

from smt_dist.optim import BlockShardedAdamW


def _parity_on_rank(rank, world, accumulation, clip, out_dir):
    model = smt_model()
    optimizer = BlockShardedAdamW(
        blocks_of(model), lr=LR, weight_decay=0.1, max_grad_norm=clip, bucket_size_mb=0.001
    )
    # 7 blocks over 2 ranks: whole blocks, balanced to within one.
    assert optimizer.num_owned == (7 + world - 1 - rank) // world
    train(model, optimizer, rank=rank, world=world, accumulation=accumulation, clip=clip)
    torch.save([p.detach() for p in blocks_of(model)], f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize(("accumulation", "clip"), [(1, None), (2, None), (1, 0.05), (2, 0.05)])
def test_two_ranks_match_one_process(tmp_path, accumulation, clip):
    run_on_ranks(_parity_on_rank, 2, accumulation, clip, str(tmp_path))
    expected = reference(accumulation, clip)
    start = blocks_of(smt_model())  # the run must move the blocks, or parity would be vacuous
    assert any((p - q).abs().max() > 1e-4 for p, q in zip(expected, start, strict=True))
    for rank in range(2):
        for got, want in zip(torch.load(tmp_path / f"rank{rank}.pt"), expected, strict=True):
            torch.testing.assert_close(got, want, **PARITY)


@pytest.mark.parametrize("fused", [True, False])
def test_single_process_is_bit_exact_with_torch_adamw(fused):
    """Fused: torch's own fused kernel on the same tensors; not fused: the pure function follows
    torch's single-tensor AdamW operation for operation. Either way the same arithmetic."""
    model = smt_model()
    optimizer = BlockShardedAdamW(blocks_of(model), lr=LR, weight_decay=0.1, fused=fused)
    train(model, optimizer, rank=None, world=1, accumulation=1, clip=None)
    expected = smt_model()
    torch_optimizer = torch.optim.AdamW(blocks_of(expected), lr=LR, weight_decay=0.1, fused=fused or None)
    train(expected, torch_optimizer, rank=None, world=1, accumulation=1, clip=None)
    start = blocks_of(smt_model())
    for got, want, before in zip(blocks_of(model), blocks_of(expected), start, strict=True):
        assert torch.equal(got, want) and not torch.equal(got, before)


def _save_on_rank(rank, world, out_dir):
    model = smt_model()
    optimizer = BlockShardedAdamW(blocks_of(model), lr=LR, weight_decay=0.1)
    train(model, optimizer, rank=rank, world=world, accumulation=1, clip=None, steps=range(5))
    consolidated = optimizer.consolidated_state_dict()
    sharded = optimizer.state_dict()
    if rank == 0:
        torch.save(
            {"model": [p.detach() for p in blocks_of(model)], "optim": consolidated},
            f"{out_dir}/consolidated.pt",
        )
    # Resume at the same world size from the sharded state, in a fresh model and optimizer.
    resumed = smt_model()
    load_blocks(resumed, blocks_of(model))
    optimizer2 = BlockShardedAdamW(blocks_of(resumed), lr=LR, weight_decay=0.1)
    optimizer2.load_state_dict(sharded)
    train(resumed, optimizer2, rank=rank, world=world, accumulation=1, clip=None, steps=range(5, STEPS))
    torch.save([p.detach() for p in blocks_of(resumed)], f"{out_dir}/sharded_rank{rank}.pt")


def _load_consolidated_on_rank(rank, world, out_dir):
    saved = torch.load(f"{out_dir}/consolidated.pt")
    model = smt_model()
    load_blocks(model, saved["model"])
    optimizer = BlockShardedAdamW(blocks_of(model), lr=LR, weight_decay=0.1)
    optimizer.load_state_dict(saved["optim"])
    train(model, optimizer, rank=rank, world=world, accumulation=1, clip=None, steps=range(5, STEPS))
    torch.save([p.detach() for p in blocks_of(model)], f"{out_dir}/consolidated_rank{rank}.pt")


def test_save_and_load_at_world_size_two_and_one(tmp_path):
    expected = reference(1, None)
    run_on_ranks(_save_on_rank, 2, str(tmp_path))
    run_on_ranks(_load_consolidated_on_rank, 2, str(tmp_path))
    for name in ("sharded_rank0", "sharded_rank1", "consolidated_rank0", "consolidated_rank1"):
        for got, want in zip(torch.load(tmp_path / f"{name}.pt"), expected, strict=True):
            torch.testing.assert_close(got, want, **PARITY)
    # World size 1: a plain process loads the 2-rank consolidated state and continues.
    saved = torch.load(tmp_path / "consolidated.pt")
    model = smt_model()
    load_blocks(model, saved["model"])
    optimizer = BlockShardedAdamW(blocks_of(model), lr=LR, weight_decay=0.1)
    optimizer.load_state_dict(saved["optim"])
    train(model, optimizer, rank=None, world=1, accumulation=1, clip=None, steps=range(5, STEPS))
    for got, want in zip(blocks_of(model), expected, strict=True):
        torch.testing.assert_close(got, want, **PARITY)
    with pytest.raises(ValueError, match="A sharded state of rank 0 of 2 cannot load on rank 0 of 1"):
        optimizer.load_state_dict({**optimizer.state_dict(), "world_size": 2})


def _count_on_rank(rank, world, out_dir):
    model = smt_model()
    optimizer = BlockShardedAdamW(blocks_of(model), lr=LR, max_grad_norm=1.0)
    carried = []
    names = ["all_reduce"] + [
        name
        for new, old in (
            ("reduce_scatter_single", "reduce_scatter_tensor"),
            ("all_gather_single", "all_gather_into_tensor"),
        )
        for name in ([new] if hasattr(dist, new) else [old])
    ]
    originals = {name: getattr(dist, name) for name in names}

    def counting(name):
        def wrapper(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            kind = "reduce_scatter" if "scatter" in name else "all_gather" if "gather" in name else name
            carried.append((kind, max(t.numel() * t.element_size() for t in tensors)))
            return originals[name](*args, **kwargs)

        return wrapper

    for name in originals:
        setattr(dist, name, counting(name))
    try:
        train(model, optimizer, rank=rank, world=world, accumulation=1, clip=None, steps=range(1))
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    torch.save({"carried": carried, "reported": optimizer.bytes_last_step}, f"{out_dir}/count{rank}.pt")


def test_collectives_carry_only_the_selected_blocks(tmp_path):
    world = 2
    run_on_ranks(_count_on_rank, world, str(tmp_path))
    blocks = sum(len(index) for index in SELECTION.values())
    block_bytes = 16 * 16 * 4  # fp32
    ideal = 2 * blocks * block_bytes  # each block once into the reduce-scatter, once out of the all-gather
    padded = 2 * world * -(-blocks // world) * block_bytes  # every rank's run padded to the longest
    for rank in range(world):
        counted = torch.load(tmp_path / f"count{rank}.pt")
        kinds = sorted(name for name, _ in counted["carried"])
        assert kinds == ["all_gather", "all_reduce", "reduce_scatter"], kinds
        total = sum(size for _, size in counted["carried"])
        assert total == counted["reported"] == padded + 8  # + the fp64 gradient-norm scalar
        assert padded - ideal <= 2 * block_bytes  # at most one padding block per collective


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="SMT block parameters of one shape"):
        BlockShardedAdamW([torch.nn.Parameter(torch.zeros(4, 4))])
    with pytest.raises(ValueError, match="offload must be None or 'cpu'"):
        BlockShardedAdamW(blocks_of(smt_model()), offload="nvme")


def test_cpu_offload_and_bf16_blocks_keep_fp32_masters():
    model = smt_model().to(torch.bfloat16)
    optimizer = BlockShardedAdamW(blocks_of(model), lr=LR, offload="cpu")
    assert optimizer._master.dtype == torch.float32 and optimizer._master.device.type == "cpu"
    masters = [p.detach().float().clone().requires_grad_(True) for p in blocks_of(model)]
    reference_optimizer = torch.optim.AdamW(masters, lr=LR)
    for step in range(3):
        batch = micro_batches(step, None, 1, 1)[0]
        model(**batch).loss.backward()
        for master, p in zip(masters, blocks_of(model), strict=True):
            master.grad = p.grad.float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reference_optimizer.step()
        with torch.no_grad():
            for master, p in zip(masters, blocks_of(model), strict=True):
                assert torch.equal(p, master.to(torch.bfloat16))  # params are the rounded fp32 masters
                p.copy_(master.to(torch.bfloat16))
