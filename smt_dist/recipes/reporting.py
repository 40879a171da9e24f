"""Where the job's metrics go besides ``train_log.jsonl``: TensorBoard, Weights & Biases, MLflow.

``--report_to tensorboard,wandb,mlflow`` (any of them, or ``none``). Only rank 0 reports. Each
works offline:

- TensorBoard: event files in ``<output_dir>/runs/<run_name>/``;
- Weights & Biases: ``wandb.init`` in ``<output_dir>`` (``WANDB_MODE=offline`` keeps it local;
  ``WANDB_PROJECT`` names the project, default ``smt_dist``);
- MLflow: ``MLFLOW_TRACKING_URI`` if set, else a local database ``<output_dir>/mlflow.db``
  (``MLFLOW_EXPERIMENT_NAME``, default ``smt_dist``).

A resumed run reports into the same run (the checkpoint's trainer state keeps each tool's run
identity): TensorBoard drops the events past the checkpoint's step, W&B and MLflow continue the
run by its id.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

# --report_to name -> (module that must import, pip package that provides it)
REPORTERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


def parse_report_to(value: str) -> tuple[str, ...]:
    """The tools ``--report_to`` names, each checked to be installed; ``none`` names none."""
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    if names == ("none",) or not names:
        return ()
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ValueError(
            f"--report_to must be none or a comma-separated list of {', '.join(REPORTERS)}, got {value!r}."
        )
    for name in names:
        module, package = REPORTERS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"--report_to {name} needs the {package} package: pip install {package}.")
    if "wandb" in names and not _wandb_can_start():
        raise ValueError(
            "--report_to wandb needs a login (wandb login, or WANDB_API_KEY) or WANDB_MODE=offline."
        )
    return names


def _wandb_can_start() -> bool:
    """Whether ``wandb.init`` can start without asking for a key (offline, or a key somewhere)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text(errors="replace")
    except OSError:
        return False


class Reporters:
    """The tools of ``--report_to`` for one run, on rank 0 (elsewhere every call does nothing).

    ``identity`` is what a resumed run needs to report into the same runs; it goes into each
    checkpoint's trainer state.
    """

    def __init__(
        self,
        names: tuple[str, ...],
        *,
        output_dir: Path,
        run_name: str,
        config: dict[str, Any],
        resume_step: int | None,
        identity: dict[str, str] | None,
        enabled: bool,
    ) -> None:
        self.identity: dict[str, str] = {"run_name": run_name, **(identity or {})}
        self._tools: list[Any] = []
        if not enabled:
            return
        openers = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}
        for name in names:
            try:
                tool = openers[name](output_dir, run_name, config, resume_step, self.identity)
            except Exception as err:  # each tool raises its own types (auth, a locked database, ...)
                self.close()
                raise ValueError(
                    f"--report_to {name} could not start its run ({type(err).__name__}: {err})."
                ) from err
            self._tools.append(tool)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at an optimizer step (names like ``train/loss``)."""
        for tool in self._tools:
            tool.log(metrics, step)

    def summary(self, values: dict[str, Any]) -> None:
        """What describes the run once (trainable share, selection per module type and layer)."""
        for tool in self._tools:
            tool.summary(values)

    def close(self) -> None:
        for tool in self._tools:
            tool.close()
        self._tools = []


class _TensorBoard:
    def __init__(
        self, output_dir: Path, run_name: str, config: dict, resume_step: int | None, identity: dict
    ):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run's first step; events the killed run wrote past it are dropped.
        self.writer = SummaryWriter(
            log_dir=str(output_dir / "runs" / run_name),
            purge_step=None if resume_step is None else resume_step + 1,
        )
        if resume_step is None:
            self.writer.add_text("args", _code(config))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def summary(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(f"run/{name}", value, 0)
            else:
                self.writer.add_text(f"run/{name}", _code(value))

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(
        self, output_dir: Path, run_name: str, config: dict, resume_step: int | None, identity: dict
    ):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "smt_dist"),
            name=run_name,
            dir=str(output_dir),
            config=config,
            id=identity.get("wandb_id"),
            resume="allow" if identity.get("wandb_id") else None,
        )
        identity["wandb_id"] = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            self.run.summary[name] = value

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(
        self, output_dir: Path, run_name: str, config: dict, resume_step: int | None, identity: dict
    ):
        import mlflow

        self.mlflow = mlflow
        if "MLFLOW_TRACKING_URI" not in os.environ:
            mlflow.set_tracking_uri(f"sqlite:///{(output_dir / 'mlflow.db').resolve()}")
        if identity.get("mlflow_run_id"):
            mlflow.start_run(run_id=identity["mlflow_run_id"])
        else:
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "smt_dist"))
            run = mlflow.start_run(run_name=run_name)
            identity["mlflow_run_id"] = run.info.run_id
            mlflow.log_params({k: "" if v is None else v for k, v in config.items()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if isinstance(value, int | float):
                self.mlflow.log_metric(f"run/{name}", value, step=0)
            else:  # a tag, not an artifact: artifacts would need a store of their own
                self.mlflow.set_tag(f"run/{name}", json.dumps(value, default=str))

    def close(self) -> None:
        self.mlflow.end_run()


def _code(value: Any) -> str:
    """A value as a Markdown code block (TensorBoard renders text as Markdown)."""
    return "```\n" + json.dumps(value, indent=1, default=str) + "\n```"
