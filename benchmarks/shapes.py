"""The Llama shapes every benchmark draws from, the model built from one, and random batches.

One table, so a size means the same model in ``compare.py``, ``warmup_memory.py``, ``comm.py``,
``scale_memory.py`` and the analytic model of ``analytic.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

SIZES = {
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=704,
        vocab_size=2000,
    ),
    "small": dict(
        hidden_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=1408,
        vocab_size=4000,
    ),
    # DESIGN.md's 119M reference shape.
    "119m": dict(
        hidden_size=1024,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=2816,
        vocab_size=8000,
    ),
    # The two models of scale_memory.py: 32 layers like LLaMA-7B, so one decoder layer is 1/32 of
    # the model (as it is at scale), about 0.4 and 1.7 GB in fp32.
    "deep111m": dict(
        hidden_size=512,
        num_hidden_layers=32,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=1408,
        vocab_size=8000,
    ),
    "deep427m": dict(
        hidden_size=1024,
        num_hidden_layers=32,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=2816,
        vocab_size=8000,
    ),
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=5632,
        vocab_size=32000,
    ),
    "7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
    ),
    "13b": dict(
        hidden_size=5120,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        intermediate_size=13824,
        vocab_size=32000,
    ),
    "70b": dict(
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=32000,
    ),
}


def build_llama(size: str, device: str = "cpu") -> torch.nn.Module:
    """A randomly initialised Llama of the named size, the same weights every time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 7B model never passes through the CPU
        model = LlamaForCausalLM(LlamaConfig(**SIZES[size], max_position_embeddings=2048))
    model.config.use_cache = False
    return model


def random_batches(
    size: str, count: int, *, batch: int, seq: int, seed: int = 1, device: str = "cpu"
) -> Iterator[dict[str, torch.Tensor]]:
    """``count`` causal-LM batches of random tokens (labels = inputs), fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        ids = torch.randint(0, SIZES[size]["vocab_size"], (batch, seq), generator=generator).to(device)
        yield {"input_ids": ids, "labels": ids}
