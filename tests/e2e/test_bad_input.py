"""Every bad input a user can hand the job, through the real script on 1 or 2 ranks.

Each case runs ``launch/train.py`` as separate rank processes (the environment torchrun would
set), over an output directory that already holds a finished run with checkpoints. Every case
must exit 1 on every rank with exactly one ``train.py: error:`` sentence among all ranks' stderr,
no traceback, and leave the previous run byte for byte as it was.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from distributed_utils import run_script_on_ranks
from safetensors.torch import load_file, save_file
from tiers import tiered

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "launch" / "train.py"
MODEL = REPO / "models" / "tiny-llama"
FAST = ["--max_steps", "2", "--save_steps", "1", "--disable_tqdm", "--smt_warmup_steps", "1"]


def run_ranks(argvs: list[list[str]], **kwargs) -> list[subprocess.CompletedProcess]:
    return run_script_on_ranks(TRAIN, argvs, cwd=REPO, **kwargs)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 1-rank run (torch backend) with two checkpoints, as a user would have one."""
    output = tmp_path_factory.mktemp("runs") / "previous"
    (result,) = run_ranks([["--output_dir", str(output), *FAST]])
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.fixture(scope="module")
def finished_deepspeed(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "previous_ds"
    (result,) = run_ranks([["--output_dir", str(output), "--deepspeed", "configs/zero2_smt.json", *FAST]])
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.fixture(scope="module", params=tiered(["torch", "deepspeed"], ["deepspeed"]))
def finished_two_ranks(request, tmp_path_factory) -> tuple[str, Path]:
    """A finished 2-rank run of each engine: (engine, output directory)."""
    output = tmp_path_factory.mktemp("runs") / f"previous_2_{request.param}"
    engine = ["--deepspeed", "configs/zero2_smt.json"] if request.param == "deepspeed" else []
    results = run_ranks([["--output_dir", str(output), *FAST, *engine]] * 2)
    assert [r.returncode for r in results] == [0, 0], results[1].stderr[-3000:]
    return request.param, output


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def nan_model(directory: Path) -> str:
    shutil.copytree(MODEL, directory)
    weights = load_file(directory / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return str(directory)


def broken_checkpoint(run: Path, tmp: Path, change) -> str:
    """A copy of the run's last checkpoint, damaged by ``change(path)``."""
    copy = tmp / "checkpoint-2"
    shutil.copytree(run / "checkpoint-2", copy)
    change(copy)
    return str(copy)


def nan_blocks(checkpoint: Path) -> None:
    path = checkpoint / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    name = next(k for k in tensors if k.endswith(".blocks"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path), metadata={"format": "smt_dist.adapter/1"})


def broken_model(tmp: Path, change) -> str:
    """A copy of the shipped model, changed by ``change(config, weights)`` (both edited in place)."""
    directory = tmp / "model"
    shutil.copytree(MODEL, directory)
    config = json.loads((directory / "config.json").read_text())
    weights = load_file(directory / "model.safetensors")
    change(config, weights)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return str(directory)


def heads_not_dividing(config: dict, weights: dict) -> None:
    config["num_attention_heads"] = 5  # hidden size 256


def one_row_short(config: dict, weights: dict) -> None:
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name] = weights[name][:-1].clone()


def smaller_vocabulary(config: dict, weights: dict) -> None:
    """A model whose embedding (and config) is 1000 rows, shipped with the 1168-token tokenizer."""
    config["vocab_size"] = 1000
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = weights[name][:1000].clone()


# case: (argv per rank given (run dir, tmp dir), expected message). One-rank cases list one argv.
CASES = {
    "resume with another block size": (
        lambda run, tmp: [
            ["--output_dir", str(run), *FAST, "--resume_from_checkpoint", "latest", "--smt_block_size", "32"]
        ],
        r"checkpoint-2 was trained with --smt_block_size 16, this run asks for 32",
    ),
    "resume with another budget": (
        lambda run, tmp: [
            ["--output_dir", str(run), *FAST, "--resume_from_checkpoint", "latest", "--smt_num_blocks", "9"]
        ],
        r"was trained with --smt_num_blocks None, this run asks for 9",
    ),
    "resume with another score": (
        lambda run, tmp: [
            ["--output_dir", str(run), *FAST, "--resume_from_checkpoint", "latest", "--smt_score", "abs_mean"]
        ],
        r"was trained with --smt_score 'mean_abs', this run asks for 'abs_mean'",
    ),
    "resume with other data": (
        lambda run, tmp: [
            [
                "--output_dir",
                str(run),
                *FAST,
                "--resume_from_checkpoint",
                "latest",
                "--data_path",
                write(tmp / "other.jsonl", '{"instruction": "a", "output": "b"}\n' * 40),
            ]
        ],
        r"was written with data '[0-9a-f]+', this run has '[0-9a-f]+'",
    ),
    "resume on another world size": (
        lambda run, tmp: [["--output_dir", str(run), *FAST, "--resume_from_checkpoint", "latest"]] * 2,
        r"was written with world_size 1, this run has 2",
    ),
    "resume with NaN blocks": (
        lambda run, tmp: [
            [
                "--output_dir",
                str(run),
                *FAST,
                "--resume_from_checkpoint",
                broken_checkpoint(run, tmp, nan_blocks),
            ]
        ],
        r"adapter_model.safetensors: the blocks of '.*' hold NaN or infinity",
    ),
    "resume with a truncated trainer state": (
        lambda run, tmp: [
            [
                "--output_dir",
                str(run),
                *FAST,
                "--resume_from_checkpoint",
                broken_checkpoint(
                    run, tmp, lambda c: (c / "trainer_state.json").write_text('{"global_step": 2, "ar')
                ),
            ]
        ],
        r"trainer_state.json is not valid JSON .*; the checkpoint's trainer state is damaged",
    ),
    "NaN base weights": (
        lambda run, tmp: [
            [
                "--output_dir",
                str(run),
                *FAST,
                "--overwrite_output_dir",
                "--model_name_or_path",
                nan_model(tmp / "m"),
            ]
        ],
        r"The weights in .*/m hold NaN or infinity",
    ),
    "unknown ZeRO key": (
        lambda run, tmp: [
            [
                "--output_dir",
                str(run),
                *FAST,
                "--overwrite_output_dir",
                "--deepspeed",
                write(tmp / "ds.json", '{"zero_optimization": {"stage": 2, "bogus": 1}}'),
            ]
        ],
        r"DeepSpeed rejects the config: .*bogus",
    ),
    "negative max_grad_norm": (
        lambda run, tmp: [
            ["--output_dir", str(run), *FAST, "--overwrite_output_dir", "--max_grad_norm", "-1"]
        ],
        r"--weight_decay and --max_grad_norm must be >= 0",
    ),
    "unknown report_to": (
        lambda run, tmp: [
            ["--output_dir", str(run), *FAST, "--overwrite_output_dir", "--report_to", "tensorboard,comet"]
        ],
        r"--report_to must be none or a comma-separated list of tensorboard, wandb, mlflow, got 'tensorboard,comet'",
    ),
    "NaN learning rate": (
        lambda run, tmp: [
            ["--output_dir", str(run), *FAST, "--overwrite_output_dir", "--learning_rate", "nan"]
        ],
        r"--learning_rate must be a finite number, got nan",
    ),
    "NaN weight decay": (
        lambda run, tmp: [
            ["--output_dir", str(run), *FAST, "--overwrite_output_dir", "--weight_decay", "nan"]
        ],
        r"--weight_decay must be a finite number, got nan",
    ),
    "NaN epochs": (
        lambda run, tmp: [["--output_dir", str(run), "--overwrite_output_dir", "--num_train_epochs", "nan"]],
        r"--num_train_epochs must be a finite number, got nan",
    ),
    "output dir under a file": (
        lambda run, tmp: [["--output_dir", str(run / "train_log.jsonl" / "sub"), *FAST]],
        r"cannot be written \(.*train_log.jsonl is not a writable directory\)",
    ),
    "output dir is a file": (
        lambda run, tmp: [["--output_dir", str(run / "train_log.jsonl"), *FAST]],
        r"--output_dir .*train_log.jsonl is a file, not a directory",
    ),
    "fp16 as a string": (
        lambda run, tmp: [
            [
                "--output_dir",
                str(run),
                *FAST,
                "--overwrite_output_dir",
                "--deepspeed",
                write(tmp / "ds.json", '{"fp16": {"enabled": "true"}}'),
            ]
        ],
        r"enables fp16, which DeepSpeed's CPU accelerator does not support",
    ),
    "fp16 as a boolean": (
        lambda run, tmp: [
            [
                "--output_dir",
                str(run),
                *FAST,
                "--overwrite_output_dir",
                "--deepspeed",
                write(tmp / "ds.json", '{"fp16": true}'),
            ]
        ],
        r'"fp16" must be an object such as \{"enabled": true\}, got True',
    ),
    "ZeRO as a number": (
        lambda run, tmp: [
            [
                "--output_dir",
                str(run),
                *FAST,
                "--overwrite_output_dir",
                "--deepspeed",
                write(tmp / "ds.json", '{"zero_optimization": 2}'),
            ]
        ],
        r'"zero_optimization" must be an object such as \{"stage": 2\}, got 2',
    ),
    "batch size as a string": (
        lambda run, tmp: [
            [
                "--output_dir",
                str(run),
                *FAST,
                "--overwrite_output_dir",
                "--deepspeed",
                write(tmp / "ds.json", '{"train_micro_batch_size_per_gpu": "2"}'),
            ]
        ],
        r"sets train_micro_batch_size_per_gpu='2'; it must be a number or \"auto\"",
    ),
    "optimizer section": (
        lambda run, tmp: [
            [
                "--output_dir",
                str(run),
                *FAST,
                "--overwrite_output_dir",
                "--deepspeed",
                write(tmp / "ds.json", '{"optimizer": {"type": "AdamW"}}'),
            ]
        ],
        r'has an "optimizer" section, which the job does not use',
    ),
    "bf16 without --bf16": (
        lambda run, tmp: [
            [
                "--output_dir",
                str(run),
                *FAST,
                "--overwrite_output_dir",
                "--deepspeed",
                write(tmp / "ds.json", '{"bf16": {"enabled": true}}'),
            ]
        ],
        r"enables bf16 but --bf16 was not given",
    ),
    "config file with =": (
        lambda run, tmp: [
            [
                "--output_dir",
                str(run),
                *FAST,
                "--overwrite_output_dir",
                "--config_file=" + write(tmp / "o.json", '{"learning_rate": -1}'),
            ]
        ],
        r"--learning_rate must be positive, got -1(\.0)?",
    ),
    "YAML syntax error": (
        lambda run, tmp: [
            [
                "--output_dir",
                str(run),
                *FAST,
                "--config_file",
                write(tmp / "o.yaml", "learning_rate: [1e-4\nseed: 3\n"),
            ]
        ],
        r"o.yaml is not valid YAML \(line \d+\)",
    ),
    "blocks and ratio": (
        lambda run, tmp: [["--output_dir", str(run), *FAST, "--smt_num_blocks", "4", "--smt_ratio", "0.01"]],
        r"Give --smt_num_blocks or --smt_ratio, not both",
    ),
    "data that is not UTF-8": (
        lambda run, tmp: [
            ["--output_dir", str(tmp / "o"), *FAST, "--data_path", str(_latin(tmp / "d.jsonl"))]
        ],
        r"d.jsonl:1: not UTF-8 text",
    ),
    "a config whose heads do not divide the hidden size": (
        lambda run, tmp: [
            [
                "--output_dir",
                str(tmp / "o"),
                *FAST,
                "--model_name_or_path",
                broken_model(tmp, heads_not_dividing),
            ]
        ],
        r"config.json is not a valid model config: The hidden size \(256\) is not a multiple of the "
        r"number of attention heads \(5\)",
    ),
    "a weight of another shape than the config's": (
        lambda run, tmp: [
            ["--output_dir", str(tmp / "o"), *FAST, "--model_name_or_path", broken_model(tmp, one_row_short)]
        ],
        r"model.safetensors: model.layers.1.mlp.up_proj.weight has shape \[\d+, 256\] where config.json "
        r"makes it \[\d+, 256\]",
    ),
    "a tokenizer larger than the embedding": (
        lambda run, tmp: [
            [
                "--output_dir",
                str(tmp / "o"),
                *FAST,
                "--model_name_or_path",
                broken_model(tmp, smaller_vocabulary),
            ]
        ],
        r"has 1168 tokens but the model's embedding \(config.json vocab_size\) has 1000 rows",
    ),
    "a data directory without data files": (
        lambda run, tmp: [["--output_dir", str(tmp / "o"), *FAST, "--data_path", str(tmp)]],
        r"holds no .json, .jsonl, .parquet, .csv files",
    ),
    "a hub dataset the hub does not give": (
        lambda run, tmp: [["--output_dir", str(tmp / "o"), *FAST, "--data_path", "nobody/nothing"]],
        r"--data_path nobody/nothing is no local file or directory, and the hub does not give its 'train' split",
    ),
    "only rank 1's data file missing": (
        lambda run, tmp: [
            ["--output_dir", str(tmp / "o"), *FAST],
            ["--output_dir", str(tmp / "o"), *FAST, "--data_path", str(tmp / "absent.jsonl")],
        ],
        r"Data file \S*absent.jsonl does not exist",
    ),
    "only rank 1's learning rate negative": (
        lambda run, tmp: [
            ["--output_dir", str(tmp / "o"), *FAST],
            ["--output_dir", str(tmp / "o"), *FAST, "--learning_rate", "-0.01"],
        ],
        r"--learning_rate must be positive, got -0.01",
    ),
    "an overwriting run that diverges before its first checkpoint": (
        lambda run, tmp: [
            [
                "--output_dir",
                str(run),
                "--overwrite_output_dir",
                "--max_steps",
                "3",
                "--save_steps",
                "0",
                "--learning_rate",
                "1e30",
                "--disable_tqdm",
                "--smt_warmup_steps",
                "1",
            ]
        ],
        r"The loss became (nan|inf) at step 2; lower --learning_rate",
    ),
    "a misspelt DeepSpeed section": (
        lambda run, tmp: [
            [
                "--output_dir",
                str(tmp / "o"),
                *FAST,
                "--deepspeed",
                write(tmp / "ds.json", '{"zero_optimisation": {"stage": 2}}'),
            ]
        ],
        r'ds.json has the unknown key "zero_optimisation"; did you mean "zero_optimization"\?',
    ),
    "ranks with different seeds": (
        lambda run, tmp: [
            ["--output_dir", str(tmp / "o"), *FAST, "--seed", "1"],
            ["--output_dir", str(tmp / "o"), *FAST, "--seed", "2"],
        ],
        r"Ranks disagree on --seed \(ranks 0 have 1; ranks 1 have 2\)",
    ),
    "ranks with different learning rates": (
        lambda run, tmp: [
            ["--output_dir", str(tmp / "o"), *FAST, "--learning_rate", "0.001"],
            ["--output_dir", str(tmp / "o"), *FAST, "--learning_rate", "0.002"],
        ],
        r"Ranks disagree on --learning_rate",
    ),
    "ranks with different block sizes": (
        lambda run, tmp: [
            ["--output_dir", str(tmp / "o"), *FAST, "--smt_block_size", "16"],
            ["--output_dir", str(tmp / "o"), *FAST, "--smt_block_size", "32"],
        ],
        r"Ranks disagree on --smt_block_size",
    ),
    "DeepSpeed on one rank, torch on the other": (
        lambda run, tmp: [
            ["--output_dir", str(tmp / "o"), *FAST, "--deepspeed", "configs/zero2_smt.json"],
            ["--output_dir", str(tmp / "o"), *FAST],
        ],
        r"Ranks disagree on the backend \(ranks 0 have 'deepspeed'; ranks 1 have 'torch'\)",
    ),
}


def _latin(path: Path) -> Path:
    path.write_bytes(b'{"instruction": "caf\xe9", "output": "b"}\n')
    return path


# One case of each kind of check every run: an argument, a DeepSpeed config, the model, the
# data, the output directory, a resume's selection, data and blocks, rank 1 alone, ranks that
# disagree, and a run that fails after the old run's removal was due.
EVERY_RUN = (
    "NaN learning rate",
    "unknown ZeRO key",
    "NaN base weights",
    "a tokenizer larger than the embedding",
    "data that is not UTF-8",
    "output dir is a file",
    "resume with another budget",
    "resume with other data",
    "resume with NaN blocks",
    "only rank 1's data file missing",
    "ranks with different seeds",
    "an overwriting run that diverges before its first checkpoint",
)


@pytest.mark.parametrize("case", tiered(sorted(CASES), EVERY_RUN))
def test_bad_input_is_one_sentence_from_one_rank_and_destroys_nothing(case, finished, tmp_path):
    make_argvs, message = CASES[case]
    before = snapshot(finished)
    results = run_ranks(make_argvs(finished, tmp_path))
    stderr = "\n".join(r.stderr for r in results)
    assert all(r.returncode == 1 for r in results), [(r.returncode, r.stderr[-2000:]) for r in results]
    assert "Traceback" not in stderr, stderr[-4000:]
    errors = [line for line in stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1, stderr[-4000:]
    assert re.search(message, errors[0]), errors[0]
    assert snapshot(finished) == before


@pytest.mark.slow  # the torch engine's twin is a CASES entry that runs every time
def test_deepspeed_checkpoint_on_another_world_size(finished_deepspeed):
    before = snapshot(finished_deepspeed)
    argv = ["--output_dir", str(finished_deepspeed), *FAST, "--deepspeed", "configs/zero2_smt.json"]
    results = run_ranks([[*argv, "--resume_from_checkpoint", "latest"]] * 2)
    errors = [line for r in results for line in r.stderr.splitlines() if line.startswith("train.py: error:")]
    assert [r.returncode for r in results] == [1, 1] and len(errors) == 1
    assert "was written with world_size 1, this run has 2" in errors[0]
    assert snapshot(finished_deepspeed) == before


def test_overwrite_removes_the_old_run_only_once_the_new_one_has_output(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    old = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-"))
    (result,) = run_ranks(
        [["--output_dir", str(run), "--overwrite_output_dir", "--max_steps", "1", "--disable_tqdm"]]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert old == ["checkpoint-1", "checkpoint-2"]
    assert not any(p.name.startswith("checkpoint-") for p in run.iterdir())  # this run saved none
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1]  # the new run's log, moved in once its adapter was written
    assert not (run / ".new-run").exists()


def test_a_torn_last_log_line_does_not_block_a_resume(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoint-2")
    with (run / "train_log.jsonl").open("a") as log:
        log.write('{"step": 3, "lo')  # killed mid-write
    (result,) = run_ranks([["--output_dir", str(run), *FAST, "--resume_from_checkpoint", "latest"]])
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


@pytest.mark.parametrize("engine", tiered(["torch", "deepspeed"], ["deepspeed"]))
def test_a_full_disk_while_saving_is_one_sentence_and_keeps_the_last_checkpoint(
    engine, finished, finished_deepspeed, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(finished_deepspeed if engine == "deepspeed" else finished, run)
    shutil.rmtree(run / "checkpoint-2")
    before = snapshot(run / "checkpoint-1")
    argv = ["--output_dir", str(run), *FAST, "--resume_from_checkpoint", "latest"]
    argv += ["--deepspeed", "configs/zero2_smt.json"] if engine == "deepspeed" else []
    # 1 MB: the log and the RNG files fit, the optimizer's state (about 1.2 MB) does not.
    (result,) = run_ranks([argv], file_size_limit=1_000_000)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1, result.stderr[-4000:]
    assert re.search(
        r"Writing checkpoint-2 to \S+ failed \(.*(File too large|unexpected pos).*\); it needs about "
        r"\d+ MB, as checkpoint-1 did, which stays the newest checkpoint\.",
        errors[0],
    ), errors[0]
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    assert snapshot(run / "checkpoint-1") == before


RANK_1_DAMAGE = {  # what of rank 1's state is damaged, per engine: the file, and how
    "optimizer file deleted": (
        {
            "torch": "optimizer_rank1.safetensors",
            "deepspeed": "engine/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        },
        lambda path: path.unlink(),
    ),
    "RNG file truncated": (
        {"torch": "rng_state_1.safetensors", "deepspeed": "rng_state_1.safetensors"},
        lambda path: path.write_bytes(path.read_bytes()[:100]),
    ),
}


@pytest.mark.parametrize("damage", tiered(sorted(RANK_1_DAMAGE), ["optimizer file deleted"]))
def test_a_resume_failing_on_rank_1_leaves_the_run_as_it_was(damage, finished_two_ranks, tmp_path):
    """Rank 0 loads its own files fine; nothing may be rewound or written before rank 1 has too."""
    engine, finished = finished_two_ranks
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    names, change = RANK_1_DAMAGE[damage]
    change(run / "checkpoint-1" / names[engine])
    shutil.rmtree(run / "checkpoint-2")  # so the resume reads checkpoint-1 and the log must stay whole
    before = snapshot(run)
    argv = ["--output_dir", str(run), *FAST, "--resume_from_checkpoint", "latest"]
    argv += ["--deepspeed", "configs/zero2_smt.json"] if engine == "deepspeed" else []
    results = run_ranks([argv] * 2)
    stderr = "\n".join(r.stderr for r in results)
    assert [r.returncode for r in results] == [1, 1], stderr[-4000:]
    assert "Traceback" not in stderr, stderr[-4000:]
    errors = [line for line in stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and Path(names[engine]).name in errors[0], errors
    assert snapshot(run) == before


def test_a_truncated_deepspeed_state_file_is_named(finished_deepspeed, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_deepspeed, run)
    state = run / "checkpoint-2" / "engine" / "mp_rank_00_model_states.pt"
    state.write_bytes(state.read_bytes()[:200])
    before = snapshot(run)
    argv = ["--output_dir", str(run), *FAST, "--deepspeed", "configs/zero2_smt.json"]
    (result,) = run_ranks([[*argv, "--resume_from_checkpoint", "latest"]])
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert f"{state} is truncated or not a DeepSpeed checkpoint file" in errors[0], errors[0]
    assert snapshot(run) == before
