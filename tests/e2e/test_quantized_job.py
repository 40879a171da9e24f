"""The training job over a quantized frozen base (bitsandbytes 4-bit and 8-bit, torchao int8), 2 ranks.

What must hold: the loss falls; the merged checkpoint is the *float* base plus the blocks, exactly
(the merge streams from the base's safetensors, never from the quantized copy); a resumed run is
bit-exact; and ZeRO-2 trains what BlockShardedAdamW trains.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from paths import MODEL
from safetensors.torch import load_file
from test_train_job import adapter_tensors, losses, run_job
from tiers import tiered

from smt_dist.core.blocks import scatter_blocks

pytest.importorskip("bitsandbytes")
QUANTIZED = tiered(
    [["--load_in_4bit"], ["--load_in_4bit", "--bnb_4bit_quant_type", "fp4", "--bnb_4bit_use_double_quant"],
     ["--load_in_8bit"], ["--torchao", "int8"]],
    ["nf4", "int8"],
    ids=["nf4", "fp4-double", "int8", "torchao"],
)  # fmt: skip


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory):
    return run_job("torchrun", tmp_path_factory.mktemp("nf4") / "out", None, "--load_in_4bit", "--merge")


@pytest.mark.parametrize("options", QUANTIZED)
def test_the_job_trains_on_a_quantized_base_and_merges_into_the_float_base_exactly(
    options, nf4_run, tmp_path
):
    output = (
        nf4_run
        if options == ["--load_in_4bit"]
        else run_job("torchrun", tmp_path / "out", None, *options, "--merge")
    )
    curve = losses(output)
    assert len(curve) == 12 and sum(curve[-3:]) / 3 < curve[0] - 0.3, curve  # the loss falls

    base, merged = load_file(MODEL / "model.safetensors"), load_file(output / "merged" / "model.safetensors")
    blocks = adapter_tensors(output)
    assert set(merged) == set(base)
    for key, weight in base.items():
        module = key.removesuffix(".weight")
        if f"{module}.blocks" in blocks:  # the float weight plus the blocks: one fp32 addition each
            expected = scatter_blocks(
                weight, blocks[f"{module}.block_index"], blocks[f"{module}.blocks"], add=True
            )
        else:
            expected = weight
        assert torch.equal(merged[key], expected), key
    # The adapter's fingerprint is the float base's, so the plain merge tool takes it as it is.
    prints = json.loads((output / "adapter" / "smt_adapter.json").read_text())["base_fingerprint"]
    assert not any("quantized" in entry for entry in prints.values())


def test_a_resumed_4bit_run_is_bit_exact(nf4_run, tmp_path):
    resumed = tmp_path / "out"
    shutil.copytree(nf4_run, resumed)
    for finished in ("adapter", "merged", "checkpoint-12"):  # as if killed after checkpoint-8
        shutil.rmtree(resumed / finished)
    run_job(
        "torchrun", resumed, None, "--load_in_4bit", "--resume_from_checkpoint", str(resumed / "checkpoint-8")
    )
    assert losses(resumed) == losses(nf4_run)
    expected = adapter_tensors(nf4_run)
    assert all(torch.equal(value, expected[key]) for key, value in adapter_tensors(resumed).items())


@pytest.mark.slow  # the nf4 run above checks the same training; this one checks DeepSpeed's engine
def test_zero2_trains_the_4bit_base_as_block_sharded_adamw_does(nf4_run, tmp_path):
    output = run_job("deepspeed", tmp_path / "out", "zero2_smt", "--load_in_4bit")
    # Same data and fp32 math; the engines reduce in another order (test_train_job: PARITY).
    torch.testing.assert_close(
        torch.tensor(losses(output)), torch.tensor(losses(nf4_run)), rtol=3e-4, atol=1e-6
    )
