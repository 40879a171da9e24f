"""Shared fixtures: tiny Hugging Face decoders built from configs (no hub) and batches."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# No hub here: a hub name fails at once instead of retrying for half a minute (the jobs the
# tests launch inherit this).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

VOCAB = 96
# GQA on purpose: k/v projections are narrower than q, as in Llama 3, Mistral and Qwen2.
_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_causal_lm(family: str = "llama", *, seed: int = 0) -> torch.nn.Module:
    """A two-layer decoder of the named family with random weights, deterministic per seed."""
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**_SHAPE))
    model.config.use_cache = False
    return model


def lm_batches(count: int, *, batch: int = 2, seq: int = 16, seed: int = 1) -> list[dict]:
    """Random token batches with labels, for warm-up and training steps."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


@pytest.fixture
def llama() -> torch.nn.Module:
    return tiny_causal_lm("llama")


def pytest_collection_modifyitems(config, items):
    """Mark what spawns processes ``multiprocess`` and everything in ``e2e/`` ``e2e``.

    A test is multi-process when its body calls ``run_on_ranks``, ``run_script_on_ranks`` or
    ``run_command`` or uses ``subprocess``: read from the names its code refers to, so a new test
    is marked without anyone remembering to.
    """
    for item in items:
        function = getattr(item, "function", None)
        names = set(getattr(getattr(function, "__code__", None), "co_names", ()))
        if names & {"run_on_ranks", "run_script_on_ranks", "run_command", "subprocess"}:
            item.add_marker(pytest.mark.multiprocess)
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Print a failure's traceback the moment it happens, not only in the end-of-run summary.

    CI stops a run at its time limit; a summary that never printed would leave only an ``F``.
    """
    report = yield
    reporter = item.config.pluginmanager.get_plugin("terminalreporter")
    if report.failed and reporter is not None:
        text = report.longreprtext
        reporter.write_line("")
        reporter.write_line(f"FAILED {report.nodeid} ({report.when}, {report.duration:.0f} s):", red=True)
        reporter.write_line(text if len(text) < 6000 else "...\n" + text[-6000:])
    return report
