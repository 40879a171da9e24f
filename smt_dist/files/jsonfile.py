"""Reading a JSON file a user or a checkpoint hands us: the value, or one sentence naming the file.

Every JSON file the package reads (DeepSpeed configs, option files, checkpoint state, adapter
configs, test sets) comes through ``read_json``, so each failure reads the same way: what the file
is, where it is, and what is wrong with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json(path: str | os.PathLike, *, what: str, context: str = "") -> Any:
    """The parsed contents of ``path``.

    Args:
        path: The file.
        what: What the file is, to start each message ("DeepSpeed config", "Trainer state").
        context: Appended to each message before its full stop ("; the checkpoint is damaged").

    Raises:
        IsADirectoryError: ``path`` is a directory.
        FileNotFoundError: ``path`` does not exist.
        ValueError: it is not UTF-8 text or not valid JSON (the line is named).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory, not a JSON file{context}.")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist{context}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not UTF-8 text{context}.") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON (line {err.lineno}: {err.msg}){context}.") from err
