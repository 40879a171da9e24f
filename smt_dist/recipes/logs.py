"""One logger that speaks on rank 0, the JSON-lines training log, and the progress bar."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from smt_dist.distributed import rank
from smt_dist.files.atomic import write_text


def get_logger() -> logging.Logger:
    """The ``smt_dist`` logger: INFO on rank 0, warnings and errors only elsewhere."""
    logger = logging.getLogger("smt_dist")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[smt_dist %(asctime)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if rank() == 0 else logging.WARNING)
    return logger


class JsonlLog:
    """Append-only ``train_log.jsonl`` written by rank 0; a resume drops lines past its step."""

    def __init__(self, path: Path, *, resume_step: int | None) -> None:
        self.path = path
        self.enabled = rank() == 0
        if not self.enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.is_file():  # rewound in one rename: a kill here leaves the old log or the new
            write_text(path, "".join(line + "\n" for line in self._lines_up_to(resume_step)))

    def _lines_up_to(self, step: int) -> list[str]:
        """The log's lines up to ``step``; a torn last line (a kill mid-write) is dropped."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(f"{self.path} is not UTF-8 text; move it away to resume.") from err
        kept = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
                line_step = int(record["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                if number == len(lines):
                    break
                raise ValueError(
                    f"{self.path}:{number}: not a log record ({err}); move the log away to resume."
                ) from err
            if line_step <= step:
                kept.append(line)
        return kept

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a dict with at least ``step``)."""
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


def make_progress(total: int, initial: int, *, disabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=disabled, desc="smt", dynamic_ncols=True)
