"""A finished job exits 0 on every rank, every time: no abort while gloo, DeepSpeed or a sampler
thread is torn down ("terminate called without an active exception", exit -6, was seen once in
a run that had written its adapter)."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
from distributed_utils import free_port, run_command, run_script_on_ranks
from paths import REPO
from tiers import tiered

ENGINES = {
    "torch": [],
    "deepspeed": ["--deepspeed", "configs/zero2_smt.json"],
    "fsdp": ["--backend", "fsdp"],
}
SHARED_MEMORY = Path("/dev/shm")
RUNS = 2  # the abort was intermittent; each run is a fresh chance for it


@pytest.mark.parametrize("engine", tiered(sorted(ENGINES), ["deepspeed"]))
def test_every_rank_of_a_finished_job_exits_0(engine, tmp_path):
    for run in range(RUNS):
        argv = ["--output_dir", str(tmp_path / f"run{run}"), "--max_steps", "1", "--smt_warmup_steps", "1"]
        argv += ["--disable_tqdm", "--report_memory", *ENGINES[engine]]  # the memory sampler's thread too
        segments = set(SHARED_MEMORY.glob("deepspeed_*"))
        # LOCAL_SIZE, as the deepspeed launcher sets it, turns on DeepSpeed's CPU shared-memory
        # all-reduce, whose per-rank /dev/shm segments (66 MB each) must not outlive the job
        extra_env = {"LOCAL_SIZE": "2"} if engine == "deepspeed" else {}
        results = run_script_on_ranks(REPO / "launch" / "train.py", [argv] * 2, cwd=REPO, extra_env=extra_env)
        assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
        assert "terminate called" not in "".join(r.stderr for r in results)
        assert (tmp_path / f"run{run}" / "adapter").is_dir()
        assert set(SHARED_MEMORY.glob("deepspeed_*")) <= segments


def test_every_rank_of_a_finished_evaluation_exits_0(tmp_path):
    for run in range(RUNS):
        argv = ["--model_name_or_path", str(REPO / "models" / "tiny-llama"), "--data_dir"]
        argv += [str(REPO / "data" / "tiny_eval"), "--limit", "4", "--output_dir", str(tmp_path / f"e{run}")]
        results = run_script_on_ranks(REPO / "launch" / "eval.py", [[*argv, "--disable_tqdm"]] * 2, cwd=REPO)
        assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
        assert (tmp_path / f"e{run}" / "accuracy.json").is_file()


def test_a_launch_past_its_timeout_dies_with_every_rank_and_shows_where_they_waited(tmp_path):
    """The suite's own guard (``run_command``): torchrun's ranks sit in sessions of their own, so
    a timeout that kills only the launcher leaves them running beside every later test."""
    script = tmp_path / "hang.py"
    script.write_text(
        "import faulthandler, signal, time\n"
        "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
        "print('waiting', flush=True)\n"
        "time.sleep(600)\n"
    )
    command = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), str(script)]
    with pytest.raises(AssertionError, match="ran past 20 s") as failure:
        run_command(command, cwd=tmp_path, timeout=20)
    assert str(failure.value).count(f'File "{script}", line 4') == 2  # each rank's stack
    time.sleep(1)
    left = [p for p in psutil.process_iter(["cmdline"]) if str(script) in (p.info["cmdline"] or [])]
    assert left == []
