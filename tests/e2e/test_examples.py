"""The drop-in examples under their real launchers, 2 CPU ranks: pipelines SMT did not write.

Each example trains a few steps and saves the way its pipeline always does (``trainer.save_model``,
``save_pretrained`` with DeepSpeed's or accelerate's gathered state dict) plus the SMT adapter.
What must hold, checked against the untouched base model read from its own file:

- ``from_pretrained`` on the pipeline's save loads with no missing or unexpected keys;
- its weights differ from the base only inside the adapter's selected blocks, and there by
  exactly the adapter's blocks (``W + D``): the training is in the standard names, not lost;
- something moved (the blocks are not all zero).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from block_helpers import block_mask
from distributed_utils import free_port, run_command
from paths import MODEL as DEFAULT_MODEL
from safetensors.torch import load_file
from tiers import tiered

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
BLOCK = 16  # the examples' SMTConfig(block_size=16)


def launch(command: list[str]) -> None:
    result = run_command(command, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def deepspeed_config(path: Path, zero: dict) -> Path:
    """A user's DeepSpeed JSON with its own ``"optimizer"`` section (DeepSpeed builds the AdamW)."""
    offload = "offload_optimizer" in zero
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        # torch's AdamW where DeepSpeed would compile its fused one (a minute per CI run); with
        # offload DeepSpeed insists on its CPU Adam, which it builds.
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 2e-3, "weight_decay": 0.0, "torch_adam": not offload},
        },
        "zero_optimization": zero,
    }
    path.write_text(json.dumps(config))
    return path


def assert_fine_tuned(saved: Path, adapter: Path) -> None:
    """The pipeline's own save is the base plus exactly the adapter's blocks, under standard names."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    base = dict(AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL).named_parameters())
    tensors = load_file(adapter / "adapter_model.safetensors")
    modules = {key.removesuffix(".blocks") for key in tensors if key.endswith(".blocks")}
    assert modules
    moved = 0
    for name, param in model.named_parameters():
        module = name.removesuffix(".weight")
        if module not in modules:
            assert torch.equal(param, base[name]), f"{name} changed but has no selected blocks"
            continue
        index, blocks = tensors[f"{module}.block_index"], tensors[f"{module}.blocks"]
        inside = block_mask(tuple(param.shape), index, BLOCK)
        assert torch.equal(param[~inside], base[name][~inside]), f"{name} changed outside its blocks"
        want = base[name].clone()
        for (row, col), block in zip(index.tolist(), blocks, strict=True):
            want[row * BLOCK : (row + 1) * BLOCK, col * BLOCK : (col + 1) * BLOCK] += block
        # W + D is one fp32 addition, done by our merge or by this loop: equal up to its rounding.
        torch.testing.assert_close(param, want, rtol=0, atol=1e-6)
        moved += int(blocks.abs().amax() > 0)
    assert moved, "no selected block moved"


@pytest.mark.parametrize(
    ("script", "stage"),
    tiered(
        [(s, z) for s in ("trainer_smt.py", "trl_sft_smt.py") for z in ("zero2", "zero3")],
        ["trainer-zero3", "trl-zero2"],
        ids=["trainer-zero2", "trainer-zero3", "trl-zero2", "trl-zero3"],
    ),
)
def test_trainer(tmp_path, script, stage):
    """TrainingArguments(deepspeed=...): under ZeRO-3 transformers loads the model partitioned.

    ``trl_sft_smt.py`` is TRL's SFTTrainer on ``messages`` with packing and assistant-only loss:
    the warm-up reads its packed batches."""
    out = tmp_path / "out"
    launch(
        ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), str(EXAMPLES / script),
         "--deepspeed", f"configs/{stage}_smt.json", "--output_dir", str(out)]
    )  # fmt: skip
    assert_fine_tuned(out / "final", out / "smt_adapter")
    # the callback wrote the adapter beside each Trainer checkpoint too
    assert (out / "checkpoint-3" / "smt_adapter" / "smt_adapter.json").is_file()


@pytest.mark.parametrize(
    "zero",
    tiered(
        [
            {"stage": 0},
            {"stage": 2},
            {"stage": 3},
            {"stage": 3, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}},
        ],
        ["zero3-offload"],
        ids=["zero0", "zero2", "zero3", "zero3-offload"],
    ),
)
def test_deepspeed_loop_with_the_json_optimizer(tmp_path, zero):
    out = tmp_path / "out"
    config = deepspeed_config(tmp_path / "ds_config.json", zero)
    launch(
        ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(EXAMPLES / "deepspeed_smt.py"),
         "--deepspeed", str(config), "--output_dir", str(out)]
    )  # fmt: skip
    assert_fine_tuned(out, out / "smt_adapter")


@pytest.mark.parametrize("stage", tiered(["zero2", "zero3"], ["zero3"]))
def test_accelerate_with_the_deepspeed_plugin(tmp_path, stage):
    out = tmp_path / "out"
    launch(
        ["accelerate", "launch", "--config_file", f"configs/accelerate_deepspeed_{stage}.yaml",
         "--main_process_port", str(free_port()), str(EXAMPLES / "accelerate_smt.py"), "--output_dir", str(out)]
    )  # fmt: skip
    assert_fine_tuned(out, out / "smt_adapter")
