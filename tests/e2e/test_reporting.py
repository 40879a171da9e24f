"""``--report_to tensorboard,wandb,mlflow``: what each tool recorded, read back with its own reader.

The job runs under torchrun on 2 ranks (W&B offline, MLflow in its local database), then resumes
from its first checkpoint. What must hold:

- each tool holds ``train/loss`` at every step with the values ``train_log.jsonl`` holds, and the
  trainable share and selection once;
- the resumed run reports into the same run: one TensorBoard directory whose steps past the
  checkpoint were replaced, not doubled; the same MLflow run and W&B run id.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from distributed_utils import free_port, run_command

REPO = Path(__file__).resolve().parents[2]


def train(output_dir: Path, *extra: str) -> None:
    command = [
        "torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "launch/train.py",
        "--output_dir", str(output_dir), "--max_steps", "4", "--save_steps", "2", "--smt_warmup_steps", "2",
        "--disable_tqdm", "--report_to", "tensorboard,wandb,mlflow", *extra,
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = run_command(command, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def logged_losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "train_log.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def wandb_records(path: Path):
    """The protobuf records of a W&B ``.wandb`` file (LevelDB's log format: 32 KiB blocks of
    chunks, each with a 7-byte header: CRC, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(run_dir: Path) -> tuple[str, dict[int, float], set[str]]:
    """A W&B offline run's id, its ``train/loss`` by step and the summary keys it set."""
    (path,) = run_dir.glob("run-*.wandb")
    run_id, losses, summary = "", {}, set()
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            items = {_key(item): json.loads(item.value_json) for item in record.history.item}
            if "train/loss" in items:
                losses[items["_step"]] = items["train/loss"]
        elif kind == "summary":
            summary |= {_key(item) for item in record.summary.update}
    return run_id, losses, summary


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B stores "train/loss" as a nested key


def test_each_tool_records_the_training_log_and_a_resume_continues_its_run(tmp_path):
    import mlflow

    out = tmp_path / "out"
    train(out)
    first = logged_losses(out)
    assert sorted(first) == [1, 2, 3, 4]
    selection = json.loads((out / "selection.json").read_text())
    trainable = sum(len(index) for index in selection["blocks"].values()) * selection["block_size"] ** 2

    (tensorboard,) = (out / "runs").iterdir()
    scalars = tensorboard_scalars(tensorboard, "train/loss")
    # TensorBoard keeps float32: equal to the log's float64 within float32 rounding (6e-8 relative).
    assert [step for step, _ in scalars] == sorted(first)
    assert all(value == pytest.approx(first[step], rel=1e-6) for step, value in scalars)
    assert tensorboard_scalars(tensorboard, "run/trainable_parameters") == [(0, trainable)]

    (wandb_dir,) = (out / "wandb").glob("offline-run-*")
    wandb_id, wandb_losses, summary = wandb_run(wandb_dir)
    assert wandb_losses == first  # JSON: the same float64
    assert {"trainable_parameters", "trainable_percent", "selection"} <= summary

    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "smt_dist"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")} == first
    assert run.data.metrics["run/trainable_parameters"] == trainable

    # Resume from step 2: steps 3 and 4 run again, into the same runs.
    train(out, "--resume_from_checkpoint", str(out / "checkpoint-2"))
    resumed = logged_losses(out)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert list((out / "runs").iterdir()) == [tensorboard]
    scalars = tensorboard_scalars(tensorboard, "train/loss")
    assert [step for step, _ in scalars] == [1, 2, 3, 4]  # the purged steps 3-4 once, not twice
    assert all(value == pytest.approx(resumed[step], rel=1e-6) for step, value in scalars)

    again = [d for d in (out / "wandb").glob("offline-run-*") if d != wandb_dir]
    assert len(again) == 1
    resumed_id, resumed_losses, _ = wandb_run(again[0])
    assert resumed_id == wandb_id and resumed_losses == {3: resumed[3], 4: resumed[4]}

    (same,) = client.search_runs([experiment.experiment_id])
    assert same.info.run_id == run.info.run_id
    history = client.get_metric_history(run.info.run_id, "train/loss")
    latest = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
    assert latest == resumed
