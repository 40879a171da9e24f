"""An analytic model of SMT, LoRA, DoRA and full fine-tuning: FLOPs, bytes and memory per step.

    python benchmarks/analytic.py                # markdown tables for LLaMA-7B and 13B shapes

``benchmarks/compare.py`` puts its measurements next to ``step_flops`` from here; the memory
tables in ``docs/performance.md`` are printed by this file. Assumptions, stated once:

- Linear layers dominate; a linear of ``P`` weights costs ``2P`` FLOPs per token forward, ``2P``
  for its input gradient and ``2P`` for its weight gradient. Attention scores cost ``4 s h`` per
  token and layer forward (``s`` sequence, ``h`` hidden) and twice that backward.
- Every method pays the forward and the input-gradient backward (every trainable layer sits
  under later layers); that sum is the floor no method training inside the network can beat.
  SMT adds three block products (forward delta, input-gradient delta, block gradient): ``6 f P``
  for a fraction ``f`` of the targeted weights in blocks. LoRA adds ``6 r (in + out)`` per
  adapted linear; DoRA also normalises the adapted weight each step (``~6 in out`` per linear).
  Full fine-tuning adds the weight gradients, ``2P``.
- Memory per GPU, bf16 weights and gradients, fp32 AdamW master and moments (16 bytes per
  trainable parameter in all), world size ``N``. ZeRO-2 keeps the bf16 weights everywhere and
  partitions gradients and optimizer states; ZeRO-3 partitions everything; offload moves the
  partitioned weights and optimizer states to host memory. Activations follow Korthikanti et
  al. (2022) with flash attention: ``34 h`` bytes per token and layer in bf16 for full
  fine-tuning; a frozen linear does not keep its input, which saves the inputs of q/k/v (shared),
  o, gate/up (shared) and down: ``2 (3 h + i)`` bytes (``i`` the MLP width). SMT keeps, per
  layer, the share of the q/k/v input its selected blocks read, at most the input once (siblings
  keep it by reference when their copies would cost more): ``2 h`` times ``MEASURED_KEPT``, what a
  real warm-up selection on the 1B shape keeps (``benchmarks/qkv_coverage.py``). LoRA keeps the
  targets' input once and the rank-``r`` intermediates. With gradient checkpointing every method
  keeps each layer's input (``2 h``) and one layer's activations at a time.
- LoRA is compared at the rank whose trainable count equals SMT's (``lora_rank_for``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """A Llama-shaped decoder."""

    name: str
    hidden: int
    layers: int
    mlp: int
    vocab: int
    heads: int
    kv_heads: int

    @classmethod
    def from_size(cls, size: str, *, name: str | None = None) -> Shape:
        """The shape of ``shapes.SIZES[size]``."""
        from shapes import SIZES

        c = SIZES[size]
        return cls(
            name or size,
            c["hidden_size"],
            c["num_hidden_layers"],
            c["intermediate_size"],
            c["vocab_size"],
            c["num_attention_heads"],
            c["num_key_value_heads"],
        )

    @property
    def kv(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def qkv_per_layer(self) -> list[tuple[int, int]]:
        """(in, out) of q, k, v."""
        return [(self.hidden, self.hidden), (self.hidden, self.kv), (self.hidden, self.kv)]

    @property
    def linear_params(self) -> int:
        attention = self.hidden * (2 * self.hidden + 2 * self.kv)
        return self.layers * (attention + 3 * self.hidden * self.mlp) + self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        return self.linear_params + self.vocab * self.hidden


SHAPES = {
    "119m": Shape.from_size("119m"),
    "7b": Shape.from_size("7b", name="LLaMA-7B"),
    "13b": Shape.from_size("13b", name="LLaMA-13B"),
    "70b": Shape.from_size("70b", name="LLaMA-2-70B"),
}


def step_flops(
    shape: Shape, method: str, *, tokens: int, seq: int, fraction: float = 0.01, rank: int = 16
) -> float:
    """Training FLOPs of one step over ``tokens`` tokens; ``method`` in full/floor/smt/lora/dora."""
    linear = 2 * shape.linear_params
    attention = 4 * seq * shape.hidden * shape.layers
    floor = 2 * linear + 3 * attention  # forward + input-gradient backward
    if method == "floor":
        extra = 0.0
    elif method == "full":
        extra = linear
    elif method == "smt":
        extra = 6 * fraction * shape.total_params
    elif method in ("lora", "dora"):
        extra = 6 * rank * shape.layers * sum(i + o for i, o in shape.qkv_per_layer)
        if method == "dora":  # weight norm of each adapted linear, forward and backward, per step
            extra += 6 * shape.layers * sum(i * o for i, o in shape.qkv_per_layer) / tokens
    else:
        raise ValueError(f"unknown method {method!r}")
    return tokens * (floor + extra)


def trainable(shape: Shape, method: str, *, fraction: float = 0.01, rank: int | None = None) -> int:
    rank = lora_rank_for(shape, fraction) if rank is None else rank
    if method == "full":
        return shape.total_params
    if method == "smt":
        return int(fraction * shape.total_params)
    if method in ("lora", "dora"):
        extra = shape.layers * sum(o for _, o in shape.qkv_per_layer) if method == "dora" else 0
        return rank * shape.layers * sum(i + o for i, o in shape.qkv_per_layer) + extra
    raise ValueError(method)


# Share of a layer's q/k/v input that SMT keeps for backward, averaged over layers, measured by
# `python benchmarks/qkv_coverage.py --size 1b` (mean_abs warm-up of 4 x 512 random tokens on the
# randomly initialised 1B shape, l = 256; benchmarks/results/coverage_1b.json), per budget.
MEASURED_KEPT = {0.005: 0.0625, 0.01: 0.0625, 0.02: 0.1640625, 0.05: 0.6171875}


def lora_rank_for(shape: Shape, fraction: float) -> int:
    """The LoRA rank on q, k, v whose trainable count equals SMT's at ``fraction``."""
    return max(
        1, round(fraction * shape.total_params / (shape.layers * sum(i + o for i, o in shape.qkv_per_layer)))
    )


def activation_bytes_per_token(
    shape: Shape,
    method: str,
    *,
    fraction: float = 0.01,
    rank: int = 16,
    checkpointing: bool = False,
    kept: float | None = None,
) -> float:
    """Activation bytes per token kept for backward (bf16), all layers; ``kept`` overrides the measurement."""
    per_layer_full = 34 * shape.hidden
    frozen_inputs = 2 * (3 * shape.hidden + shape.mlp)
    if method == "full":
        per_layer = per_layer_full
    elif method == "smt":  # the kept share of the q/k/v input, at most the input once
        share = MEASURED_KEPT[fraction] if kept is None else kept
        per_layer = per_layer_full - frozen_inputs + 2 * shape.hidden * share
    else:  # LoRA/DoRA: the shared input of q, k, v and the r-dim outputs of A
        per_layer = per_layer_full - frozen_inputs + 2 * (shape.hidden + 3 * rank)
    if checkpointing:  # each layer's input, and one layer recomputed at a time
        return 2 * shape.hidden * shape.layers + per_layer
    return per_layer * shape.layers


def memory_per_gpu(
    shape: Shape,
    method: str,
    *,
    stage: str,
    world: int = 8,
    tokens_per_gpu: int = 4096,
    fraction: float = 0.01,
    rank: int | None = None,
    checkpointing: bool = False,
) -> dict[str, float]:
    """GiB per GPU: weights, gradients, optimizer states, activations, total (LoRA at SMT's count)."""
    rank = lora_rank_for(shape, fraction) if rank is None else rank
    weights = 2 * shape.total_params
    train = trainable(shape, method, fraction=fraction, rank=rank)
    grads = 2 * train
    optim = 12 * train  # fp32 master + two moments
    if stage == "zero2":
        parts = {"weights": weights, "gradients": grads / world, "optimizer": optim / world}
    elif stage == "zero3":
        parts = {"weights": weights / world, "gradients": grads / world, "optimizer": optim / world}
    elif stage == "zero3_offload":
        # Partitioned weights and optimizer states live in host memory; one layer is gathered at a time.
        parts = {
            "weights": 2 * 2 * shape.total_params / shape.layers,
            "gradients": grads / world,
            "optimizer": 0.0,
        }
    else:
        raise ValueError(stage)
    parts["activations"] = tokens_per_gpu * activation_bytes_per_token(
        shape, method, fraction=fraction, rank=rank, checkpointing=checkpointing
    )
    parts["total"] = sum(parts.values())
    return {k: v / 2**30 for k, v in parts.items()}


def memory_table(shape: Shape, *, world: int = 8, tokens_per_gpu: int = 4096, fraction: float = 0.01) -> str:
    """Markdown table of per-GPU memory for each method, ZeRO stage and checkpointing setting."""
    rank = lora_rank_for(shape, fraction)
    rows = [
        f"{shape.name}, {world} GPUs, {tokens_per_gpu} tokens per GPU per micro-batch, bf16 weights, fp32 AdamW "
        f"states; SMT at {fraction:.0%}, LoRA on q, k, v at rank {rank} (the same trainable count)",
        "",
        "| stage | checkpointing | method | trainable | weights | grads | Adam | activations | total GiB "
        "| vs full | vs LoRA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stage in ("zero2", "zero3", "zero3_offload"):
        for checkpointing in (False, True):
            kwargs = dict(
                stage=stage, world=world, tokens_per_gpu=tokens_per_gpu, checkpointing=checkpointing
            )
            totals = {
                m: memory_per_gpu(shape, m, fraction=fraction, **kwargs)["total"] for m in ("full", "lora")
            }
            for method in ("full", "lora", "smt"):
                m = memory_per_gpu(shape, method, fraction=fraction, **kwargs)
                share = 100 * trainable(shape, method, fraction=fraction) / shape.total_params
                rows.append(
                    f"| {stage} | {'on' if checkpointing else 'off'} | {method} | {share:.2f}% | "
                    f"{m['weights']:.1f} | {m['gradients']:.2f} | {m['optimizer']:.2f} | {m['activations']:.1f} | "
                    f"{m['total']:.1f} | {m['total'] / totals['full']:.2f} | {m['total'] / totals['lora']:.3f} |"
                )
    return "\n".join(rows)


# ---- every phase of the job, per GPU (launch/train.py's path) --------------------------------------

ENGINES = ("zero2", "zero3", "zero3_offload", "fsdp2", "fsdp2_offload")
PHASES = ("load", "warmup", "build", "train", "save")
GIB = 2**30


def layer_params(shape: Shape) -> int:
    """Parameters of one decoder layer."""
    return shape.hidden * (2 * shape.hidden + 2 * shape.kv) + 3 * shape.hidden * shape.mlp


def job_phase_memory(
    shape: Shape,
    engine: str,
    *,
    world: int = 8,
    tokens_per_gpu: int = 4096,
    checkpointing: bool = False,
    fraction: float = 0.01,
    score: str = "mean_abs",
) -> dict[str, dict[str, float]]:
    """GiB per rank in each phase of the job: ``{"gpu": {...}, "host": {...}}``.

    The path the code takes, bf16 weights, SMT at ``fraction`` of the parameters in bf16 blocks
    with fp32 AdamW states:

    - the frozen base: whole on every GPU (ZeRO-2), or ``1/world`` of it (ZeRO-3, FSDP2), in host
      memory with offload; loading reads it partitioned, gathering at most one module (ZeRO-3,
      through transformers) or one row slice (FSDP2) at a time;
    - gathered weights while a layer runs: ZeRO-3 keeps at most ``stage3_max_live_parameters``
      (one layer, configs/zero3_smt.json's "auto") plus a prefetch bucket of ``0.9 h^2``; FSDP2
      holds the running layer and the one it prefetches;
    - activations: per token and layer, full fine-tuning's ``34 h`` bytes minus the inputs frozen
      linears need not keep, plus the selected input column-blocks (upper bound); the warm-up with
      ``mean_abs`` keeps each target's whole input (q, k, v share one) and ``abs_mean`` keeps
      column-block sums only. With gradient checkpointing each layer keeps only its input
      (``2 h``) and one layer is recomputed at a time. The fp32 logits and their gradient,
      ``8 vocab`` bytes per token, come on top;
    - blocks, their gradients and Adam states are partitioned over the ranks (ZeRO, FSDP);
      ``zero3_offload`` keeps the Adam states in host memory; saving gathers the blocks alone.
    """
    n, h, tokens = shape.total_params, shape.hidden, tokens_per_gpu
    weights = 2 * n
    partitioned = engine != "zero2"
    offload = engine.endswith("_offload")
    part = weights / world if partitioned else weights
    layer = 2 * layer_params(shape)
    if engine.startswith("zero3"):
        window = layer + 2 * 0.9 * h * h
        loading = 2 * h * shape.mlp  # transformers gathers one module at a time to load it
    elif engine.startswith("fsdp2"):
        window = 2 * layer
        loading = 2 * h * shape.mlp / world  # one row slice per parameter
    else:
        window, loading = 0.0, 0.0
    trainable_params = fraction * n
    blocks = 2 * trainable_params / (world if partitioned else 1)
    grads = 2 * trainable_params / world
    adam = 12 * trainable_params / world
    logits = 8 * shape.vocab * tokens
    train_acts = tokens * activation_bytes_per_token(
        shape, "smt", fraction=fraction, checkpointing=checkpointing
    )
    # The warm-up keeps what training keeps around frozen layers, plus (mean_abs) each target's
    # whole input: q/k/v share one, o_proj has its own. abs_mean keeps only column-block sums.
    warm_acts = tokens * activation_bytes_per_token(
        shape, "smt", fraction=fraction, checkpointing=checkpointing, kept=2.0 if score == "mean_abs" else 0.0
    )
    base_gpu = 0.0 if offload else part
    adam_gpu = 0.0 if engine == "zero3_offload" else adam
    gpu = {
        "load": base_gpu + (0.0 if offload else loading),
        "warmup": base_gpu + window + warm_acts + logits,
        "build": base_gpu + blocks + adam_gpu,
        "train": base_gpu + window + train_acts + logits + blocks + grads + adam_gpu,
        "save": base_gpu + blocks + adam_gpu + 2 * trainable_params,
    }
    host_rank = (part if offload else 0.0) + (adam if engine == "zero3_offload" else 0.0)
    return {
        "gpu": {k: v / GIB for k, v in gpu.items()},
        "host": {"per_rank": host_rank / GIB, "per_node_of_8": 8 * host_rank / GIB},
    }


def job_phase_table(
    shape: Shape, *, world: int = 8, gpu_gib: float = 80.0, tokens_per_gpu: int = 4096
) -> str:
    """Markdown table of every phase's GiB per GPU, and whether the job fits ``gpu_gib``."""
    rows = [
        f"{shape.name} ({shape.total_params / 1e9:.1f}B), {world} x {gpu_gib:.0f} GB GPUs, {tokens_per_gpu} "
        "tokens per GPU, SMT at 1%, bf16; GiB per GPU by phase (host GiB per rank where offloaded)",
        "",
        "| engine | checkpointing | " + " | ".join(PHASES) + " | peak | host | fits |",
        "|" + " --- |" * (len(PHASES) + 5),
    ]
    for engine in ENGINES:
        for checkpointing in (False, True):
            m = job_phase_memory(
                shape, engine, world=world, tokens_per_gpu=tokens_per_gpu, checkpointing=checkpointing
            )
            peak = max(m["gpu"].values())
            fits = "yes" if peak <= 0.9 * gpu_gib * 1e9 / GIB else "no"  # 10% left for the allocator, kernels
            cells = " | ".join(f"{m['gpu'][p]:.1f}" for p in PHASES)
            rows.append(
                f"| {engine} | {'on' if checkpointing else 'off'} | {cells} | {peak:.1f} | "
                f"{m['host']['per_rank']:.1f} | {fits} |"
            )
    return "\n".join(rows)


# ---- a 4-bit base on one GPU (QLoRA's setting; --load_in_4bit) ----------------------------------

# Bytes per decoder-linear weight in NF4: 4 bits plus one fp32 scale per 64 weights (4.5 bits);
# with double quantization the scales are 8-bit in blocks of 256 with fp32 scales of their own
# (Dettmers et al. 2023: 0.127 bits of scales per weight).
NF4_BYTES = {False: 4.5 / 8, True: (4 + 0.127) / 8}
GPU_SIZES_GIB = (24, 48, 80)
GPU_HEADROOM = 0.9  # the CUDA context, the allocator's fragmentation and kernels' workspaces


def four_bit_memory(
    shape: Shape,
    method: str,
    *,
    tokens: int = 4096,
    fraction: float = 0.01,
    checkpointing: bool = False,
    double_quant: bool = True,
) -> dict[str, float]:
    """GiB on one GPU with the decoder's linears in NF4 (embeddings and LM head bf16), for
    ``smt`` or ``lora`` (QLoRA) at the same trainable count, as ``job_phase_memory`` counts them:
    16 bytes per trainable parameter (bf16 value and gradient, fp32 AdamW master and moments),
    the activations of ``activation_bytes_per_token``, the fp32 logits and their gradient, and
    one layer's widest weight dequantized to bf16 at a time. SMT's warm-up (``mean_abs``) keeps
    each target's whole input and no trainable state; ``peak`` is the larger of it and training."""
    rank = lora_rank_for(shape, fraction)
    decoder = shape.linear_params - shape.vocab * shape.hidden
    base = (
        NF4_BYTES[double_quant] * decoder + 2 * 2 * shape.vocab * shape.hidden + 2 * shape.hidden * shape.mlp
    )
    logits = 8 * shape.vocab * tokens
    acts = activation_bytes_per_token(
        shape, method, fraction=fraction, rank=rank, checkpointing=checkpointing
    )
    parts = {
        "weights": base,
        "trainable": 16 * trainable(shape, method, fraction=fraction, rank=rank),
        "activations": tokens * acts + logits,
    }
    parts["train"] = sum(parts.values())
    parts["warmup"] = 0.0
    if method == "smt":
        warm = activation_bytes_per_token(
            shape, "smt", fraction=fraction, checkpointing=checkpointing, kept=2.0
        )
        parts["warmup"] = base + tokens * warm + logits
    parts["peak"] = max(parts["train"], parts["warmup"])
    return {k: v / GIB for k, v in parts.items()}


def four_bit_table(shapes: list[Shape], *, tokens: int = 4096, fraction: float = 0.01) -> str:
    """Markdown: each shape and method with a 4-bit base on one GPU, and which GPU sizes it fits."""
    rows = [
        f"One GPU, NF4 base with double quantization (embeddings and LM head bf16), {tokens} tokens per "
        f"micro-batch, SMT at {fraction:.0%} and QLoRA on q, k, v at the same trainable count; fits: peak "
        f"at most {GPU_HEADROOM:.0%} of the GPU",
        "",
        "| model | checkpointing | method | weights | trainable + Adam | activations + logits | warm-up | train "
        "| peak GiB | fits |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for shape in shapes:
        for checkpointing in (False, True):
            for method in ("lora", "smt"):
                m = four_bit_memory(
                    shape, method, tokens=tokens, fraction=fraction, checkpointing=checkpointing
                )
                fits = ", ".join(
                    f"{g} GB" for g in GPU_SIZES_GIB if m["peak"] <= GPU_HEADROOM * g * 1e9 / GIB
                )
                warm = f"{m['warmup']:.1f}" if method == "smt" else "-"
                rows.append(
                    f"| {shape.name} | {'on' if checkpointing else 'off'} | {'QLoRA' if method == 'lora' else 'SMT'} "
                    f"| {m['weights']:.1f} | {m['trainable']:.2f} | {m['activations']:.1f} | {warm} "
                    f"| {m['train']:.1f} | {m['peak']:.1f} | {fits or 'none'} |"
                )
    return "\n".join(rows)


def main() -> None:
    for key in ("7b", "13b"):
        print(memory_table(SHAPES[key]))
        print()
    print(four_bit_table([SHAPES["13b"], SHAPES["70b"]]))
    print()
    print(four_bit_table([SHAPES["13b"], SHAPES["70b"]], tokens=1024))
    print()
    for key in ("13b", "70b"):
        print(job_phase_table(SHAPES[key]))
        print()
    single = SHAPES["7b"]
    print("Single GPU, no ZeRO (the paper's setting), LLaMA-7B, 4096 tokens:")
    for method in ("full", "lora", "smt"):
        m = memory_per_gpu(single, method, stage="zero2", world=1)
        print(f"  {method:5} {m['total']:.1f} GiB")


if __name__ == "__main__":
    main()
