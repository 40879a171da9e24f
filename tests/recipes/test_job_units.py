"""Fast unit tests of the job's parts: arguments, checkpoints on disk, the log, the schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from smt_dist.files.state import load_rng, save_rng
from smt_dist.recipes.arguments import parse_args
from smt_dist.recipes.checkpoints import STATE_NAME, check_resume, checkpoints, save_checkpoint
from smt_dist.recipes.logs import JsonlLog
from smt_dist.recipes.schedule import lr_lambda

# ---- arguments -------------------------------------------------------------------------------


def test_report_to_names_installed_tools_and_wandb_needs_a_way_to_start(monkeypatch, tmp_path):
    from smt_dist.recipes import reporting

    assert reporting.parse_report_to("none") == ()
    assert reporting.parse_report_to("tensorboard, mlflow,tensorboard") == ("tensorboard", "mlflow")
    monkeypatch.setitem(reporting.REPORTERS, "mlflow", ("no_such_module_here", "mlflow"))
    with pytest.raises(ValueError, match=r"--report_to mlflow needs the mlflow package: pip install mlflow"):
        reporting.parse_report_to("mlflow")
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # none there
    with pytest.raises(ValueError, match=r"--report_to wandb needs a login .* or WANDB_MODE=offline"):
        parse_args(["--report_to", "wandb"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert parse_args(["--report_to", "wandb"]).report_to == "wandb"


def test_a_config_file_is_parsed_like_the_command_line_and_loses_to_it(tmp_path):
    options = tmp_path / "o.yaml"
    options.write_text("learning_rate: 0.25\nseed: 3\nmerge: true\nsmt_block_size: 32\n")
    for form in (["--config_file", str(options)], [f"--config_file={options}"]):
        args = parse_args([*form, "--seed", "9"])
        assert (args.learning_rate, args.seed, args.merge, args.smt_block_size) == (0.25, 9, True, 32)


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        ("learning_rate: [1\n", ".yaml", r"not valid YAML \(line 2\)"),
        ('{"learning_rate": 1,}', ".json", r"not valid JSON \(line 1"),
        ("seed: three\n", ".yaml", r"--seed/--seed: invalid int value: 'three'|invalid int value"),
        ("bogus: 1\n", ".yaml", r"Unknown options in the config file .*: bogus"),
        ("- 1\n", ".yaml", r"must hold a mapping of option names"),
    ],
)
def test_bad_config_files_are_one_sentence(tmp_path, text, suffix, message):
    options = tmp_path / f"o{suffix}"
    options.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_args(["--config_file", str(options)])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--learning_rate", "inf"], "--learning_rate must be a finite number"),
        (["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number"),
        (["--smt_ratio", "nan"], "--smt_ratio must be a finite number"),
        (["--weight_decay", "-0.1"], "--weight_decay and --max_grad_norm must be >= 0"),
        (["--warmup_steps", "-1"], "--warmup_steps must be >= 0"),
        (["--smt_num_blocks", "3", "--smt_ratio", "0.1"], "not both"),
        (["--per_device_train_batch_size", "x"], "invalid int value: 'x'; see --help"),
        (["--backend", "horovod"], "--backend must be auto or one of"),
        (["--config_file"], "--config_file needs a path"),
    ],
)
def test_bad_arguments_are_one_sentence(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


# ---- checkpoints on disk ------------------------------------------------------------------------


class _Backend:
    """Writes one file per checkpoint, as an engine's state would."""

    def save(self, directory: Path) -> None:
        (directory / "engine.bin").write_text("state")


def _save(output: Path, step: int, *, keep: int = 2, stale=()) -> Path:
    return save_checkpoint(
        _Backend(),
        output,
        step=step,
        state={"global_step": step},
        write_adapter=lambda path: path.mkdir(),
        keep=keep,
        stale=list(stale),
    )


def test_checkpoints_are_renamed_into_place_and_pruned(tmp_path):
    for step in (2, 4, 6):
        _save(tmp_path, step)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert not list(tmp_path.glob(".*partial"))
    final = tmp_path / "checkpoint-6"
    assert json.loads((final / STATE_NAME).read_text()) == {"global_step": 6}
    assert (final / "engine.bin").is_file() and (final / "rng_state_0.safetensors").is_file()
    (final / "leftover").write_text("from the first save of step 6")
    _save(tmp_path, 6)  # a resumed run saving a step it saved before replaces it whole
    assert not (final / "leftover").exists()


def test_an_overwritten_runs_checkpoints_go_once_the_new_one_is_in_place(tmp_path):
    old = [_save(tmp_path, step) for step in (10, 20)]
    _save(tmp_path, 2, keep=1, stale=old)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2"]  # not checkpoint-20, the old run's


def test_random_states_round_trip_through_safetensors(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    save_rng(tmp_path / "rng.safetensors")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    load_rng(tmp_path / "rng.safetensors")
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_resume_rules():
    args = {"smt_block_size": 16, "learning_rate": 1e-3, "seed": 1}
    state = {"args": dict(args), "run": {"data": "abc", "world_size": 2}}
    path = Path("out/checkpoint-4")
    check_resume(path, state, {**args, "learning_rate": 5e-4}, {"data": "abc", "world_size": 2})  # may change
    with pytest.raises(ValueError, match="trained with --smt_block_size 16, this run asks for 32"):
        check_resume(path, state, {**args, "smt_block_size": 32}, {"data": "abc"})
    with pytest.raises(ValueError, match="written with world_size 2, this run has 4"):
        check_resume(path, state, args, {"world_size": 4})
    with pytest.raises(ValueError, match="lacks the arguments of its run"):
        check_resume(path, {"global_step": 4}, args, {})


# ---- the log -----------------------------------------------------------------------------------


def _log(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_log_truncation_on_resume(tmp_path):
    path = tmp_path / "train_log.jsonl"
    _log(path, [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)])
    JsonlLog(path, resume_step=2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    _log(path, [json.dumps({"step": 1}), json.dumps({"step": 2}), '{"step": 3, "lo'])
    JsonlLog(path, resume_step=3)  # a torn last line (killed mid-write) is dropped
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    _log(path, [json.dumps({"step": 1}), "garbage", json.dumps({"step": 3})])
    with pytest.raises(ValueError, match=r"train_log.jsonl:2: not a log record"):
        JsonlLog(path, resume_step=3)
    JsonlLog(path, resume_step=None)
    assert path.read_text() == ""


# ---- the schedule -----------------------------------------------------------------------------


class _Args:
    def __init__(self, kind: str, warmup: int) -> None:
        self.lr_scheduler_type, self.warmup_steps = kind, warmup


def test_learning_rate_schedules():
    linear = lr_lambda(_Args("linear", 2), 10)
    assert [linear(s) for s in (0, 1)] == [1 / 3, 2 / 3]
    assert linear(2) == 1.0 and linear(6) == 0.5 and linear(10) == 0.0 and linear(12) == 0.0
    cosine = lr_lambda(_Args("cosine", 0), 10)
    assert cosine(0) == 1.0 and math.isclose(cosine(5), 0.5) and math.isclose(cosine(10), 0.0, abs_tol=1e-12)
    constant = lr_lambda(_Args("constant", 0), 10)
    assert {constant(s) for s in range(12)} == {1.0}
