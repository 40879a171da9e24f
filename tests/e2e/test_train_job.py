"""launch/train.py under the real launchers (deepspeed, torchrun, mpirun) with 2 CPU ranks.

One ZeRO-2 run is the reference; ZeRO-3, ZeRO-3 with offload, torchrun and mpirun must reproduce
its loss curve and blocks, and a run killed after a checkpoint and resumed must equal it bit for
bit. Bad inputs are run in-process through ``main`` (same code path, no launcher start-up).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from block_helpers import block_mask
from distributed_utils import free_port, kill_tree, run_command
from paths import MODEL as DEFAULT_MODEL
from safetensors.torch import load_file
from tiers import tiered

from smt_dist import load_smt_adapter
from smt_dist.recipes import finetune

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "launch" / "train.py"
COMMON = ["--max_steps", "12", "--save_steps", "4", "--disable_tqdm", "--seed", "7"]
# Same data, same seed, same fp32 math in every configuration; ZeRO stages, launchers and
# optimizer kernels may reduce in another order. On the pretrained model many block gradients are
# near zero, where Adam's m / (sqrt(v) + eps) turns a last-bit difference into a visible part of
# an update, and the difference grows step by step: ZeRO-3 against ZeRO-2, the step-1 gradient
# norms agree to 2e-7 relative, the losses drift to 1e-5 by step 3 and 2.4e-4 at worst (step 9),
# the blocks to 1.3e-4 absolute after 12 steps at lr 5e-3 (measured 2026-12-04 with torch 2.13,
# DeepSpeed 0.19.8; with earlier packages 1.1e-4 and 4.3e-5). Parity allows 1e-3 relative on
# losses and 5e-4 on blocks, a tenth of one lr-sized step; what a real fault changes is far
# larger: a skipped or repeated step moves the selected elements by about lr (5e-3), a missed
# block leaves its elements up to 12 lr off, and a wrong gradient scale doubles the logged norm.
PARITY = dict(rtol=1e-3, atol=1e-6)
BLOCK_PARITY = dict(rtol=0, atol=5e-4)


def command(launcher: str, output_dir: Path, config: str | None, *extra: str) -> list[str]:
    """The launch command for a DeepSpeed config name, ``"fsdp"`` (FSDP2) or ``None`` (BlockShardedAdamW)."""
    port = str(free_port())
    backend = {None: [], "fsdp": ["--backend", "fsdp"]}.get(config, ["--deepspeed", f"configs/{config}.json"])
    if launcher == "accelerate":
        backend = []  # the accelerate config selects FSDP2
    script = [str(TRAIN), *backend, "--output_dir", str(output_dir), *COMMON, *extra]
    if launcher == "accelerate":
        return [
            "accelerate",
            "launch",
            "--config_file",
            "configs/fsdp2_smt.yaml",
            "--main_process_port",
            port,
            *script,
        ]
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", "2", "--master_port", port, *script]
    if launcher == "torchrun":
        return ["torchrun", "--nproc_per_node", "2", "--master_port", port, *script]
    return ["mpirun", "-n", "2", "-env", "MASTER_PORT", port, sys.executable, *script]


def run_job(launcher: str, output_dir: Path, config: str | None = "zero2_smt", *extra: str) -> Path:
    result = run_command(command(launcher, output_dir, config, *extra), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output_dir


def losses(output_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def grad_norms(output_dir: Path) -> torch.Tensor:
    lines = (output_dir / "train_log.jsonl").read_text().splitlines()
    return torch.tensor([json.loads(line)["grad_norm"] for line in lines])


def adapter_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def base_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return run_job("deepspeed", tmp_path_factory.mktemp("zero2") / "out", "zero2_smt", "--merge")


def test_zero2_trains_and_writes_adapter_and_merged_checkpoint(reference):
    curve = losses(reference)
    assert len(curve) == 12
    assert sum(curve[-3:]) / 3 < curve[0] - 0.3, curve  # the loss falls

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(reference / "merged")
    base = base_model()
    blocks = adapter_tensors(reference)
    selected = {
        key[: -len(".block_index")]: value for key, value in blocks.items() if key.endswith(".block_index")
    }
    assert selected, "no blocks were selected"
    base_params = dict(base.named_parameters())
    for name, param in merged.named_parameters():
        module = name[: -len(".weight")]
        if module in selected:
            inside = block_mask(tuple(param.shape), selected[module], 16)
            assert torch.equal(param[~inside], base_params[name][~inside]), name
            assert not torch.equal(param[inside], base_params[name][inside]), name
        else:
            assert torch.equal(param, base_params[name]), name

    reloaded = load_smt_adapter(base_model(), reference / "adapter")
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # the same weights up to one fp32 addition per element: logits agree to float rounding
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
    summary = json.loads((reference / "selection.json").read_text())
    assert summary["summary"]["num_blocks"] == sum(len(v) for v in selected.values())


@pytest.mark.parametrize(
    ("launcher", "config"),
    # every run: each engine once (ZeRO-3, BlockShardedAdamW, FSDP2), under each launcher but accelerate
    tiered(
        [
            ("deepspeed", "zero3_smt"),
            ("deepspeed", "zero3_offload_smt"),
            ("torchrun", "zero2_smt"),
            ("mpirun", "zero2_smt"),
            ("torchrun", None),  # BlockShardedAdamW, no DeepSpeed
            ("mpirun", None),
            ("torchrun", "fsdp"),  # FSDP2
            ("accelerate", "fsdp"),
        ],
        [("deepspeed", "zero3_smt"), ("mpirun", None), ("torchrun", "fsdp")],
    ),
)
def test_other_stages_and_launchers_match_zero2(reference, tmp_path, launcher, config):
    output_dir = run_job(launcher, tmp_path / "out", config)
    torch.testing.assert_close(torch.tensor(losses(output_dir)), torch.tensor(losses(reference)), **PARITY)
    # Each engine computes the logged norm its own way (ZeRO's partitions, BlockShardedAdamW's
    # owned blocks, FSDP's DTensors). At step 1 the weights are the same: equal but for summation
    # order (2.3e-7 relative, measured). Later the weights drift as the losses do, and a gradient
    # amplifies that drift (1.5e-3 relative at worst, ZeRO-3 at step 10): 1e-2. A norm of
    # unaveraged or unscaled gradients would be off by the world size, 2x.
    norms, expected_norms = grad_norms(output_dir), grad_norms(reference)
    torch.testing.assert_close(norms[0], expected_norms[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(norms, expected_norms, rtol=1e-2, atol=0)
    expected = adapter_tensors(reference)
    for key, value in adapter_tensors(output_dir).items():
        torch.testing.assert_close(value, expected[key], **BLOCK_PARITY)


@pytest.mark.parametrize(
    ("config", "extra"),
    tiered(
        [
            ("zero3_smt", ["--gradient_checkpointing"]),  # recomputation changes no value
            ("fsdp", ["--gradient_checkpointing"]),
            ("zero2_smt", ["--smt_selection", "REFERENCE/selection.json"]),  # the same blocks, no warm-up
        ],
        ["zero3-checkpointing", "given-selection"],
        ids=["zero3-checkpointing", "fsdp-checkpointing", "given-selection"],
    ),
)
def test_checkpointing_and_a_given_selection_match_zero2(reference, tmp_path, config, extra):
    extra = [arg.replace("REFERENCE", str(reference)) for arg in extra]
    launcher = "torchrun" if config == "fsdp" else "deepspeed"
    output_dir = run_job(launcher, tmp_path / "out", config, *extra)
    torch.testing.assert_close(torch.tensor(losses(output_dir)), torch.tensor(losses(reference)), **PARITY)
    expected = adapter_tensors(reference)
    for key, value in adapter_tensors(output_dir).items():
        torch.testing.assert_close(value, expected[key], **BLOCK_PARITY)
    if "--smt_selection" in extra:
        assert not (output_dir / "block_scores.safetensors").exists()  # no warm-up ran
        assert (
            json.loads((output_dir / "selection.json").read_text())["digest"]
            == json.loads((reference / "selection.json").read_text())["digest"]
        )


@pytest.mark.parametrize(
    ("launcher", "config"),
    tiered([("deepspeed", "zero3_smt"), ("torchrun", None)], ["torchrun"], ids=["zero3", "torchrun"]),
)
def test_validation_loss_equals_one_process_on_the_held_out_records(tmp_path, launcher, config):
    """--val_set_size holds records out and reports their loss: recomputed here in one process from
    the base and the run's adapter, token-weighted over the same held-out records."""
    from paths import DATA as DEFAULT_DATA
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smt_dist.recipes.data import collate, read_records
    from smt_dist.recipes.tokenized import hold_out, tokenized_dataset

    output_dir = run_job(launcher, tmp_path / "out", config, "--val_set_size", "20", "--eval_steps", "5")
    records = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [5, 10, 12]
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    examples, _ = tokenized_dataset(
        read_records(DEFAULT_DATA), tokenizer, max_seq_length=128, dataset_format="alpaca"
    )
    _, held = hold_out(examples, 20, seed=7)  # COMMON's --seed 7
    held = list(held)
    model = load_smt_adapter(AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL), output_dir / "adapter")
    total = tokens = 0.0
    with torch.no_grad():
        for first in range(0, len(held), 5):
            batch = collate(held[first : first + 5], pad_token_id=tokenizer.pad_token_id)
            count = float((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch).loss.item() * count
            tokens += count
    # same fp32 model and records, other batch shapes and summation order
    assert records[-1]["eval_loss"] == pytest.approx(total / tokens, rel=1e-5)


@pytest.mark.parametrize(
    ("launcher", "config", "extra"),
    tiered(
        [
            ("deepspeed", "zero2_smt", ()),
            ("torchrun", None, ()),
            ("torchrun", "fsdp", ()),
            (
                "torchrun",
                None,
                ("--packing", "--data_path", "data/tiny_chat.jsonl", "--max_seq_length", "256"),
            ),
        ],
        ["zero2", "packing"],  # packing runs BlockShardedAdamW's resume too
        ids=["zero2", "torchrun", "fsdp", "packing"],
    ),
)
def test_killed_run_resumes_to_the_uninterrupted_result(reference, tmp_path, launcher, config, extra):
    if config != "zero2_smt" or extra:  # the run's own uninterrupted twin is the bit-exact reference
        reference = run_job(launcher, tmp_path / "uninterrupted", config, *extra)
    output_dir = tmp_path / "out"
    job = subprocess.Popen(
        command(launcher, output_dir, config, *extra),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (output_dir / "checkpoint-8").is_dir():
        assert job.poll() is None and time.monotonic() < deadline, "the run ended before checkpoint-8"
        time.sleep(0.1)
    kill_tree(job.pid)  # torchrun's ranks sit in sessions of their own: a killpg would miss them
    job.wait()
    assert not (output_dir / "adapter").exists()

    run_job(launcher, output_dir, config, *extra, "--resume_from_checkpoint", "latest")
    assert losses(output_dir) == losses(reference)  # bit-exact on CPU fp32
    expected = adapter_tensors(reference)
    assert all(torch.equal(value, expected[key]) for key, value in adapter_tensors(output_dir).items())


@pytest.fixture
def previous_run(tmp_path) -> Path:
    """An output directory holding an earlier run that bad input must leave untouched."""
    output_dir = tmp_path / "previous"
    output_dir.mkdir()
    (output_dir / "train_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (output_dir / "notes.txt").write_text("keep me")
    return output_dir


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    "missing model": (
        lambda d: ["--model_name_or_path", str(d / "no-model")],
        "Model directory .*no-model does not exist",
    ),
    "missing data": (
        lambda d: ["--data_path", str(d / "none.jsonl")],
        "Data file .*none.jsonl does not exist",
    ),
    "malformed data": (
        lambda d: [
            "--data_path",
            write(d / "bad.jsonl", '{"instruction": "a", "output": "b"}\n{"output": 1}\n'),
        ],
        r"bad.jsonl:2: the record lacks a non-empty string field 'instruction'",
    ),
    "empty data": (lambda d: ["--data_path", write(d / "empty.jsonl", "")], "empty.jsonl holds no records"),
    "block size": (
        lambda d: ["--smt_block_size", "48"],
        "has out_features=256, which block size 48 does not divide",
    ),
    "budget": (
        lambda d: ["--smt_num_blocks", "100000"],
        "budget of 100000 blocks exceeds the 4608 blocks of the 24",
    ),
    "score": (lambda d: ["--smt_score", "max"], "score must be one of mean_abs, abs_mean, got 'max'"),
    "fp16 on cpu": (
        lambda d: ["--deepspeed", write(d / "fp16.json", '{"fp16": {"enabled": true}}')],
        "enables fp16, which DeepSpeed's CPU accelerator does not support",
    ),
    "batch conflict": (
        lambda d: ["--deepspeed", write(d / "ds.json", '{"train_micro_batch_size_per_gpu": 3}')],
        "sets train_micro_batch_size_per_gpu=3 but the command line implies 8",
    ),
    "missing selection": (
        lambda d: ["--smt_selection", str(d / "none.json")],
        "Selection file .*none.json does not exist",
    ),
    "selection of another model": (
        lambda d: [
            "--smt_selection",
            write(
                d / "sel.json",
                '{"format": "smt_dist.selection/1", "block_size": 16, "blocks": {"model.layers.9.mlp.up_proj": [[0, 0]]}}',
            ),
        ],
        "sel.json names module 'model.layers.9.mlp.up_proj', which this model lacks",
    ),
    "selection of another block size": (
        lambda d: [
            "--smt_selection",
            write(
                d / "sel.json",
                '{"format": "smt_dist.selection/1", "block_size": 32, "blocks": {"model.layers.0.self_attn.q_proj": [[0, 0]]}}',
            ),
        ],
        "selects blocks of size 32 but --smt_block_size is 16",
    ),
    "no checkpoint": (
        lambda d: ["--resume_from_checkpoint", str(d / "ckpt")],
        "ckpt is not a checkpoint of this job",
    ),
    "conversation without an assistant turn": (
        lambda d: [
            "--data_path",
            write(d / "chat.jsonl", CHAT + '{"messages": [{"role": "user", "content": "hi"}]}\n'),
        ],
        r"chat.jsonl:2: the conversation has no assistant turn",
    ),
    "unknown role": (
        lambda d: ["--data_path", write(d / "chat.jsonl", CHAT.replace('"user"', '"robot"'))],
        r"chat.jsonl:1: turn 0 of 'messages' has the unknown role 'robot'",
    ),
    "undetectable format": (
        lambda d: ["--data_path", write(d / "qa.jsonl", '{"question": "a", "answer": "b"}\n')],
        r"qa.jsonl:1: cannot tell the data format from the fields \['answer', 'question'\]",
    ),
    "chat template that fails": (
        lambda d: [
            "--data_path",
            write(d / "chat.jsonl", CHAT),
            "--chat_template",
            write(
                d / "t.jinja",
                "{% generation %}{{ raise_exception('no system turns here') }}{% endgeneration %}",
            ),
        ],
        r"chat.jsonl: record 1: the chat template fails on this conversation \(no system turns here\)",
    ),
    "chat template that is not jinja": (
        lambda d: [
            "--data_path",
            write(d / "chat.jsonl", CHAT),
            "--chat_template",
            write(d / "t.jinja", "{% for %}"),
        ],
        r"t.jinja is not a Jinja chat template",
    ),
    "two quantizations": (
        lambda d: ["--load_in_4bit", "--load_in_8bit"],
        "Give one way of quantizing the base, not --load_in_4bit and --load_in_8bit",
    ),
    "a 4-bit option without 4 bits": (
        lambda d: ["--bnb_4bit_quant_type", "fp4"],
        r"The --bnb_4bit_\* options need --load_in_4bit",
    ),
    "torchao int4": (lambda d: ["--torchao", "int4"], r"--torchao must be int8 \(int4 needs CUDA\)"),
    "4-bit under zero-3": (
        lambda d: [
            "--load_in_4bit",
            "--deepspeed",
            write(d / "z3.json", '{"zero_optimization": {"stage": 3}}'),
        ],
        r"A quantized base \(4-bit nf4\) cannot be partitioned by ZeRO-3 .* use ZeRO-1/2",
    ),
    "8-bit under fsdp2": (
        lambda d: ["--load_in_8bit", "--backend", "fsdp"],
        r"A quantized base \(8-bit\) cannot be sharded by FSDP2",
    ),
    "unknown format": (
        lambda d: ["--dataset_format", "yaml"],
        "--dataset_format must be auto or one of alpaca",
    ),
}
CHAT = '{"messages": [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}]}\n'


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_sentence_and_touches_nothing(case, previous_run, tmp_path, capsys):
    make_args, message = BAD_INPUTS[case]
    before = snapshot(previous_run)
    argv = ["--output_dir", str(previous_run), "--overwrite_output_dir", *make_args(tmp_path)]
    assert finetune.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error: ") and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert snapshot(previous_run) == before


def test_existing_run_needs_overwrite_or_resume(previous_run, capsys):
    before = snapshot(previous_run)
    assert finetune.main(["--output_dir", str(previous_run)]) == 1
    assert "already holds a run; pass --overwrite_output_dir" in capsys.readouterr().err
    assert snapshot(previous_run) == before


def test_script_exits_non_zero_with_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            "--data_path",
            str(tmp_path / "x.jsonl"),
            "--output_dir",
            str(tmp_path / "o"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"train.py: error: Data file {tmp_path / 'x.jsonl'} does not exist."
    )
    assert not (tmp_path / "o").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow  # every run: chat data through the job in the packing resume, parquet in tests/recipes
def test_conversations_train_from_jsonl_and_parquet_alike(tmp_path):
    """The shipped ``messages`` JSONL under DeepSpeed and the same conversations as parquet under
    torchrun: the same examples (assistant turns only in the loss), so the same loss curve."""
    import datasets

    chat = REPO / "data" / "tiny_chat.jsonl"
    parquet = tmp_path / "chat.parquet"
    datasets.Dataset.from_json(str(chat)).to_parquet(str(parquet))
    steps = ["--max_steps", "6", "--save_steps", "0"]
    jsonl_run = run_job("deepspeed", tmp_path / "jsonl", "zero2_smt", "--data_path", str(chat), *steps)
    parquet_run = run_job("torchrun", tmp_path / "parquet", None, "--data_path", str(parquet), *steps)
    curve = losses(jsonl_run)
    assert len(curve) == 6 and curve[-1] < curve[0], curve
    torch.testing.assert_close(losses(parquet_run), curve, **PARITY)
