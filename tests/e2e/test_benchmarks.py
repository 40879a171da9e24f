"""The benchmark scripts still run and their JSON agrees with itself (a smoke run, tiny sizes).

Speed and memory are measured by the scripts, not asserted here: this machine is shared and
noisy. What is checked is that every method ran, and that the reported ratios are the ratios of
the reported numbers, so a refactor cannot silently break the figures in docs/performance.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_utils import run_command
from tiers import tiered

REPO = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> None:
    result = run_command([sys.executable, f"benchmarks/{script}", *args], cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow  # gpu.sh --dry-run runs this script too, every time
def test_compare_runs_every_method(tmp_path):
    out = tmp_path / "compare.json"
    run(
        "compare.py",
        "--size",
        "tiny",
        "--steps",
        "1",
        "--warmup-steps",
        "0",
        "--smt-warmup",
        "1",
        "--json",
        str(out),
    )
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {
        "warmup-mean_abs",
        "warmup-abs_mean",
        "full",
        "smt-0.5",
        "smt-1",
        "smt-2",
        "smt-5",
        "lora",
        "dora",
    }
    for name, r in results.items():
        assert r["time_vs_full"] == pytest.approx(r["median_step_s"] / results["full"]["median_step_s"]), name
        assert r["memory_vs_lora"] == pytest.approx(r["peak_bytes"] / results["lora"]["peak_bytes"]), name
        if not name.startswith("warmup"):
            saved = r["saved_activation_bytes"] / results["lora"]["saved_activation_bytes"]
            assert r["saved_vs_lora"] == pytest.approx(saved) and r["saved_activation_bytes"] > 0, name
    coverage = results["smt-1"]["coverage"]
    assert 0 < coverage["kept"] <= min(1.0, coverage["copies"]) + 1e-9
    smt = [results[f"smt-{p}"]["trainable"] for p in ("0.5", "1", "2", "5")]
    assert smt == sorted(smt) and smt[0] > 0
    assert (
        abs(results["lora"]["trainable"] - results["smt-1"]["trainable"])
        < 0.5 * results["smt-1"]["trainable"]
    )


@pytest.mark.slow
def test_layer_and_memory_benchmarks_run(tmp_path):
    run(
        "layer.py",
        "--out-features",
        "64",
        "--in-features",
        "128",
        "--block-size",
        "16",
        "--tokens",
        "32",
        "--repeats",
        "1",
        "--json",
        str(tmp_path / "layer.json"),
    )
    rows = json.loads((tmp_path / "layer.json").read_text())["rows"]
    assert [r["variant"].split()[0] for r in rows] == ["frozen", "trainable", "SparseLinear", "SparseLinear"]
    run("warmup_memory.py", "--size", "tiny", "--steps", "1", "--json", str(tmp_path / "memory.json"))
    report = json.loads((tmp_path / "memory.json").read_text())
    assert report["warmup_vs_smt_peak"] == pytest.approx(
        report["phases"]["warmup"]["peak_mib"] / report["phases"]["smt"]["peak_mib"]
    )


@pytest.mark.slow  # gpu.sh --dry-run runs this script too, every time
def test_scale_memory_reports_every_phase(tmp_path):
    out = tmp_path / "scale.json"
    run(
        "scale_memory.py",
        "--sizes",
        "tiny,small",
        "--configs",
        "zero3,fsdp",
        "--models_dir",
        str(tmp_path / "models"),
        "--out",
        str(out),
    )
    report = json.loads(out.read_text())
    small, large = report["sizes"]
    delta = report["model_mib"][large] - report["model_mib"][small]
    for config in ("zero3", "fsdp"):
        peaks, growth = report["configs"][config]["peaks"], report["configs"][config]["growth"]
        assert set(peaks[small]) == {"load", "warmup", "build", "train", "save", "merge", "job"}, config
        for phase, value in growth.items():
            assert value == pytest.approx((peaks[large][phase] - peaks[small][phase]) / delta), (
                config,
                phase,
            )


def test_analytic_model_orders_the_methods():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from analytic import SHAPES, memory_per_gpu, step_flops

    shape = SHAPES["7b"]
    flops = {m: step_flops(shape, m, tokens=4096, seq=2048) for m in ("floor", "smt", "lora", "full")}
    assert flops["floor"] < flops["smt"] < flops["full"] and flops["floor"] < flops["lora"] < flops["full"]
    for stage in ("zero2", "zero3", "zero3_offload"):
        assert (
            memory_per_gpu(shape, "smt", stage=stage)["total"]
            < memory_per_gpu(shape, "full", stage=stage)["total"]
        )


def test_analytic_job_phases_partition_and_checkpointing_help():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from analytic import ENGINES, SHAPES, job_phase_memory

    shape = SHAPES["70b"]
    per_gpu = {e: job_phase_memory(shape, e, checkpointing=True)["gpu"] for e in ENGINES}
    assert per_gpu["zero3"]["load"] == pytest.approx(per_gpu["zero2"]["load"] / 8, rel=0.05)
    assert (
        per_gpu["zero3_offload"]["load"] == 0
        and per_gpu["fsdp2_offload"]["train"] < per_gpu["fsdp2"]["train"]
    )
    for engine in ENGINES:
        without = job_phase_memory(shape, engine, checkpointing=False)["gpu"]
        assert per_gpu[engine]["train"] < without["train"], engine


def test_analytic_four_bit_base_is_a_quarter_of_bf16_and_70b_fits_one_80gb_gpu_with_checkpointing():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from analytic import SHAPES, four_bit_memory

    shape = SHAPES["70b"]
    bf16 = 2 * shape.total_params / 2**30
    smt = four_bit_memory(shape, "smt", checkpointing=True)
    assert 0.25 < smt["weights"] / bf16 < 0.3  # 4.13 bits a decoder weight, embeddings in bf16
    assert smt["peak"] == max(smt["warmup"], smt["train"])
    lora = four_bit_memory(shape, "lora", checkpointing=True)
    assert smt["trainable"] == pytest.approx(lora["trainable"], rel=0.01)  # the same trainable count
    assert 43 < smt["peak"] < 0.9 * 80e9 / 2**30  # over 48 GB's 90%, under 80 GB's
    assert four_bit_memory(shape, "smt", checkpointing=False)["peak"] > smt["peak"]


@pytest.mark.parametrize(
    "tables",
    tiered(
        ["3", "3,6"], ["lora-smt-random"], ids=["lora-smt-random", "every-method"]
    ),  # every run: 7 runs, not 19
)
def test_quality_runs_every_method_at_matched_budgets_and_resumes(tmp_path, tables):
    out = tmp_path / "quality.json"
    every = tables == "3,6"
    smoke = ["--model", str(REPO / "models" / "tiny-llama"), "--steps", "2", "--lrs", "1e-3", "--extend", "0",
             "--ranks", "1", "--lr_rank", "1", "--seeds", "0,1", "--limit", "2", "--warmup_steps", "1",
             "--table6_percent", "0.2", "--output", str(out), "--tables", tables,
             "--methods", "full,lora,dora,smt,random" if every else "lora,smt,random"]  # fmt: skip
    run("quality.py", *smoke)
    state = json.loads(out.read_text())
    runs = state["runs"]
    methods = {"lora", "smt", "random"}
    if every:
        methods |= {"full", "dora", "smt_q", "smt_k", "smt_v", "smt_qkv"}
    assert {r["method"] for r in runs.values()} == methods | {"base"}
    assert len(runs) == 1 + 2 * len(methods)  # base, then each method at both seeds
    for r in runs.values():
        assert set(r["test"]) == {"tiny_facts", "tiny_arith"}
        assert all(0.0 <= value <= 1.0 for value in r["test"].values())
    by = {(r["method"], r.get("seed")): r for r in runs.values()}
    # SMT and the random control get exactly LoRA's trainable count at the same rank.
    assert by["smt", 0]["trainable"] == by["random", 0]["trainable"] == by["lora", 0]["trainable"]
    if every:
        assert by["full", 0]["percent"] == 100.0
        # The Table 6 variants spend one budget on their own module types only.
        assert set(by["smt_v", 0]["selection"]["by_type"]) == {"v_proj"}
        assert by["smt_q", 0]["trainable"] == by["smt_qkv", 0]["trainable"]
    # Seeds change the random control's blocks, and the summary holds each method's two seeds.
    assert by["random", 0]["selection"] != by["random", 1]["selection"]
    assert {row["seeds"] for row in state["summary"]["rows"]} == {2}
    assert out.with_suffix(".png").is_file()
    # Resuming runs nothing again: the file is unchanged but for the summary it rewrites.
    before = out.read_text()
    run("quality.py", *smoke)
    assert json.loads(out.read_text())["runs"] == json.loads(before)["runs"]


def test_the_moving_warmup_of_one_batch_scores_as_the_frozen_warmup_does():
    """One batch: the summed gradient is the base point's, so its mean |G| per block is mean_abs's."""
    import itertools
    import sys

    from conftest import lm_batches, tiny_causal_lm

    from smt_dist import SMTConfig, collect_block_scores

    sys.path.insert(0, str(REPO / "benchmarks"))
    import selection_variants

    config = SMTConfig(block_size=16, target_modules="q_proj,k_proj,v_proj,up_proj,down_proj", num_blocks=4,
                       warmup_steps=1)  # fmt: skip
    batch = lm_batches(1)[0]
    moving = selection_variants.moving_warmup_scores(tiny_causal_lm(), [batch], config)
    frozen = collect_block_scores(tiny_causal_lm(), itertools.cycle([batch]), config)
    assert moving.keys() == frozen.keys()
    for name in frozen:
        # the same gradient, summed in another order (dense weight grad against per-block probes)
        torch.testing.assert_close(moving[name], frozen[name], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["residual", "cap1"])
def test_a_selection_variant_spends_lora_s_budget_its_own_way(tmp_path, variant):
    out = tmp_path / "variant.json"
    run("selection_variants.py", variant, "--model", str(REPO / "models" / "tiny-llama"), "--steps", "2",
        "--lrs", "1e-3", "--limit", "2", "--rank", "1", "--output", str(out))  # fmt: skip
    runs = json.loads(out.read_text())["runs"]
    (key,) = [k for k in runs if k != "base"]
    selection = runs[key]["selection"]
    blocks = sum(selection["by_type"].values())
    # LoRA r=1's count on q, k, v, up, down of the 6-layer, 256-wide model, in 16 x 16 blocks
    assert runs[key]["trainable"] == blocks * 256 == 75 * 256
    if variant == "cap1":  # one block per (module, row-block): as many pairs as blocks
        assert selection["row_blocks"] == blocks


@pytest.mark.slow
def test_packing_benchmark_packs_and_reports_its_ratio(tmp_path):
    run("packing.py", "--steps", "1", "--threads", "1", "--json", str(tmp_path / "packing.json"))
    results = json.loads((tmp_path / "packing.json").read_text())["results"]
    chat = next(r for name, r in results.items() if "tiny_chat" in name)
    assert chat["packed"]["rows"] < chat["padded"]["rows"]  # several conversations a row
    assert chat["packed"]["padding"] < chat["padded"]["padding"]
    for report in results.values():
        ratio = report["packed"]["tokens_per_second"] / report["padded"]["tokens_per_second"]
        assert report["packed_over_padded_tokens_per_second"] == pytest.approx(ratio, abs=0.01)


def test_the_gpu_script_runs_every_step_on_the_cpu_and_its_ratios_hold(tmp_path):
    """``gpu.sh --dry-run``: the GPU machine's script, every step at tiny sizes on the CPU."""
    out = tmp_path / "gpu"
    done = run_command(["bash", "benchmarks/gpu.sh", str(out), "--dry-run"], cwd=REPO, timeout=1100)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FAILED" not in done.stdout, done.stdout
    environment = json.loads((out / "environment.json").read_text())
    assert environment["device"] == "cpu" and environment["torch"]
    versus = json.loads((out / "versus.json").read_text())
    for engine in ("zero2", "fsdp"):
        smt, lora = versus["results"][engine]["smt-1"], versus["results"][engine]["lora-1"]
        ratio = versus["smt_over_lora"][engine]["smt-1/lora-1"]
        assert ratio["step_time"] == pytest.approx(smt["median_step_s"] / lora["median_step_s"])
        assert ratio["trainable"] == pytest.approx(smt["trainable"] / lora["trainable"])
        assert 0.9 < ratio["trainable"] < 1.1  # LoRA's rank is chosen for SMT's count
        assert smt["adapter_bytes"] > 0 and smt["warmup_s"] > 0 and lora["warmup_s"] == 0
    summary = (out / "summary.md").read_text()
    for heading in ("## compare.py", "## versus.py", "## scale_memory.py"):
        assert heading in summary, summary
    assert not (out / "models").exists()


def test_the_gpu_script_stops_at_once_without_cuda(tmp_path):
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh", str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "torch sees no CUDA device" in done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing ran


def test_the_quantized_benchmark_matches_qlora_s_count_and_its_ratios_hold(tmp_path):
    out = tmp_path / "quantized.json"
    run("quantized.py", "--size", "tiny", "--rounds", "1", "--steps", "1", "--warmup-steps", "0",
        "--smt-warmup", "1", "--seq", "64", "--threads", "1", "--selection-models", "tiny-llama",
        "--limit", "2", "--accuracy-steps", "2", "--json", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    speed = report["speed_and_memory"]
    assert speed["smt-nf4"]["trainable"] == speed["qlora-nf4"]["trainable"]  # the tiny shape matches exactly
    for key, value in speed["smt_over_qlora"].items():
        assert value == pytest.approx(speed["smt-nf4"][key] / speed["qlora-nf4"][key]), key
    assert speed["nf4_over_fp32_smt"]["train_peak_mib"] == pytest.approx(
        speed["smt-nf4"]["train_peak_mib"] / speed["smt-fp32"]["train_peak_mib"]
    )
    jaccard = report["selection_jaccard"]["tiny-llama"]
    assert set(jaccard) == {f"{k} {p}%" for k in ("nf4", "fp4", "int8") for p in (1, 5)}
    assert all(0.0 <= v <= 1.0 for v in jaccard.values()) and jaccard["int8 5%"] > 0.5  # int8 barely moves it
    methods = {r["method"] for r in report["accuracy"].values()}
    assert methods == {"base", "lora", "smt"}
