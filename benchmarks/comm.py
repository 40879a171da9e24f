"""Bytes per step that SMT's optimizer exchanges, next to the ideal and to DDP full fine-tuning.

    python benchmarks/comm.py                 # 2 gloo ranks on CPU, the small Llama, 1% budget

Spawns 2 ranks. SMT: warm-up scoring and selection, then ``BlockShardedAdamW`` steps; its
``bytes_last_step`` counts the buffers it hands to reduce-scatter and all-gather. Ideal: one
reduce-scatter plus one all-gather of exactly the selected blocks in fp32. DDP: the same model
fully trainable under ``DistributedDataParallel``, counted by a comm hook that sees every bucket
it all-reduces. All counts are per rank, in the same unit (bytes of the collective's buffer).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from shapes import SIZES, build_llama, random_batches


def batch(size: str, rank: int, step: int, seq: int) -> dict[str, torch.Tensor]:
    return next(random_batches(size, 1, batch=2, seq=seq, seed=1000 * rank + step))


def worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from smt_dist import SMTConfig, apply_smt, choose_blocks, count_parameters
    from smt_dist.optim import BlockShardedAdamW

    config = SMTConfig(
        block_size=args.block_size,
        ratio=args.ratio,
        warmup_steps=2,
        target_modules=tuple(args.targets.split(",")),
    )
    model = build_llama(args.size)
    selection, _ = choose_blocks(model, (batch(args.size, rank, s, args.seq) for s in range(2)), config)
    apply_smt(model, selection, config)
    optimizer = BlockShardedAdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, max_grad_norm=1.0
    )
    model(**batch(args.size, rank, 10, args.seq)).loss.backward()
    optimizer.step()
    smt_bytes = optimizer.bytes_last_step

    full = build_llama(args.size)
    ddp_bytes = 0

    def counting_allreduce(state, bucket):
        nonlocal ddp_bytes
        ddp_bytes += bucket.buffer().numel() * bucket.buffer().element_size()
        work = dist.all_reduce(bucket.buffer().div_(world), async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    ddp = torch.nn.parallel.DistributedDataParallel(full)
    ddp.register_comm_hook(None, counting_allreduce)
    ddp(**batch(args.size, rank, 10, args.seq)).loss.backward()

    if rank == 0:
        result = {
            "world_size": world,
            "selected_blocks": selection.num_blocks,
            "trainable_parameters": selection.num_parameters,
            "model_parameters": count_parameters(full),
            "smt_bytes_per_step": smt_bytes,
            "ideal_bytes_per_step": 2 * selection.num_parameters * 4,
            "ddp_full_ft_bytes_per_step": ddp_bytes,
        }
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/comm.json"))
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(worker, args=(2, port, args, out), nprocs=2, join=True)
        result = json.loads(Path(out).read_text())
    result["smt_vs_ideal"] = result["smt_bytes_per_step"] / result["ideal_bytes_per_step"]
    result["smt_vs_ddp_full_ft"] = result["smt_bytes_per_step"] / result["ddp_full_ft_bytes_per_step"]
    print(
        f"{result['model_parameters']:,} parameters, {result['selected_blocks']} blocks of {args.block_size}^2 "
        f"({result['trainable_parameters']:,} trainable), {result['world_size']} ranks, bytes per rank per step"
    )
    print(f"{'SMT (BlockShardedAdamW)':28} {result['smt_bytes_per_step']:>14,}")
    print(f"{'ideal RS + AG of the blocks':28} {result['ideal_bytes_per_step']:>14,}")
    print(f"{'DDP, full fine-tuning':28} {result['ddp_full_ft_bytes_per_step']:>14,}")
    print(
        f"SMT / ideal: {result['smt_vs_ideal']:.4f}   SMT / DDP full FT: {result['smt_vs_ddp_full_ft']:.5f}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
