"""A checkpoint handed to --resume_from_checkpoint cannot run code, whatever file it is planted in.

For each backend, one finished 1-rank run; then, file by file, a copy of its last checkpoint gets
a pickle whose unpickling would create a marker file, and the run is resumed from it. The marker
must never appear, and the resume must either stop with one sentence naming a file or (for a
file the resume never reads) finish exactly as a resume from the clean checkpoint does.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_bad_input import run_ranks
from tiers import tiered

BACKENDS = {
    "deepspeed": ["--deepspeed", "configs/zero2_smt.json"],
    "torch": [],
    "fsdp": ["--backend", "fsdp"],
}
ARGS = ["--max_steps", "3", "--save_steps", "2", "--disable_tqdm", "--smt_warmup_steps", "1"]


class Payload:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    if path.suffix == ".pt":  # torch's zip format, so the loader gets as far as the pickle
        torch.save({"state": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


def outcome(output: Path) -> tuple:
    records = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"], r["learning_rate"]) for r in records]  # not the timing
    adapter = load_file(output / "adapter" / "adapter_model.safetensors")
    return losses, {k: v.tolist() for k, v in sorted(adapter.items())}


@pytest.mark.parametrize("backend", tiered(sorted(BACKENDS), ["deepspeed", "torch"]))
def test_planted_payloads_never_run(backend, tmp_path):
    run = tmp_path / "run"
    (first,) = run_ranks([["--output_dir", str(run), *BACKENDS[backend], *ARGS]])
    assert first.returncode == 0, first.stderr[-3000:]
    clean = tmp_path / "clean"
    shutil.copytree(run, clean)
    (resumed,) = run_ranks(
        [["--output_dir", str(clean), *BACKENDS[backend], *ARGS, "--resume_from_checkpoint", "latest"]]
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = outcome(clean)

    files = sorted(
        p.relative_to(run / "checkpoint-2") for p in (run / "checkpoint-2").rglob("*") if p.is_file()
    )
    assert len(files) >= 5, files
    refused = []
    for index, name in enumerate(files):
        output = tmp_path / f"planted{index}"
        shutil.copytree(run, output)
        marker = tmp_path / f"marker{index}"
        plant(output / "checkpoint-2" / name, marker)
        argv = ["--output_dir", str(output), *BACKENDS[backend], *ARGS, "--resume_from_checkpoint", "latest"]
        (result,) = run_ranks([argv])
        assert not marker.exists(), f"unpickling {name} ran the payload"
        assert "Traceback" not in result.stderr, (name, result.stderr[-3000:])
        if result.returncode == 0:  # a file the resume does not read
            assert outcome(output) == expected, name
        else:
            errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
            assert result.returncode == 1 and len(errors) == 1, (name, result.stderr[-3000:])
            assert Path(name).name in errors[0], (name, errors[0])  # the file at fault, named
            refused.append(str(name))
    # Every file a resume reads was among the refused: the engine state, the adapter, the RNG, ...
    assert any("adapter" in name for name in refused) and any("rng_state" in name for name in refused), (
        refused
    )
