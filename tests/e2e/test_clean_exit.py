"""A finished job exits 0 on every rank, every time: no abort while gloo, DeepSpeed or a sampler
thread is torn down ("terminate called without an active exception", exit -6, was seen once in
a run that had written its adapter)."""

from __future__ import annotations

import pytest
from distributed_utils import run_script_on_ranks
from paths import REPO
from tiers import tiered

ENGINES = {
    "torch": [],
    "deepspeed": ["--deepspeed", "configs/zero2_smt.json"],
    "fsdp": ["--backend", "fsdp"],
}
RUNS = 2  # the abort was intermittent; each run is a fresh chance for it


@pytest.mark.parametrize("engine", tiered(sorted(ENGINES), ["deepspeed"]))
def test_every_rank_of_a_finished_job_exits_0(engine, tmp_path):
    for run in range(RUNS):
        argv = ["--output_dir", str(tmp_path / f"run{run}"), "--max_steps", "1", "--smt_warmup_steps", "1"]
        argv += ["--disable_tqdm", "--report_memory", *ENGINES[engine]]  # the memory sampler's thread too
        results = run_script_on_ranks(REPO / "launch" / "train.py", [argv] * 2, cwd=REPO)
        assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
        assert "terminate called" not in "".join(r.stderr for r in results)
        assert (tmp_path / f"run{run}" / "adapter").is_dir()


def test_every_rank_of_a_finished_evaluation_exits_0(tmp_path):
    for run in range(RUNS):
        argv = ["--model_name_or_path", str(REPO / "models" / "tiny-llama"), "--data_dir"]
        argv += [str(REPO / "data" / "tiny_eval"), "--limit", "4", "--output_dir", str(tmp_path / f"e{run}")]
        results = run_script_on_ranks(REPO / "launch" / "eval.py", [[*argv, "--disable_tqdm"]] * 2, cwd=REPO)
        assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
        assert (tmp_path / f"e{run}" / "accuracy.json").is_file()
