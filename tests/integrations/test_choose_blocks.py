"""Two gloo ranks: summed warm-up scores equal one process over all batches; selections agree."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batches, tiny_causal_lm
from distributed_utils import run_on_ranks

from smt_dist import SMTConfig, collect_block_scores, select_blocks
from smt_dist.integrations.prepare import check_same_selection, choose_blocks

# Each rank sums its own micro-batches, then one all-reduce sums the ranks: the same fp32 terms
# added in another order as the single-process run, so 1e-5 relative.
TOL = dict(rtol=1e-5, atol=1e-8)


def _score_on_rank(rank, world_size, score, out_dir):
    config = SMTConfig(block_size=16, num_blocks=5, warmup_steps=2, score=score, target_modules=("*_proj",))
    batches = lm_batches(4)[rank * 2 : rank * 2 + 2]
    selection, scores = choose_blocks(tiny_causal_lm(), batches, config)
    torch.save({"scores": scores, "digest": selection.digest()}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("score", ["mean_abs", "abs_mean"])
def test_two_ranks_equal_one_process(score, tmp_path):
    run_on_ranks(_score_on_rank, 2, score, str(tmp_path))
    config = SMTConfig(block_size=16, num_blocks=5, warmup_steps=4, score=score, target_modules=("*_proj",))
    reference = collect_block_scores(tiny_causal_lm(), lm_batches(4), config)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0]["digest"] == results[1]["digest"] == select_blocks(reference, config).digest()
    for name, expected in reference.items():
        for result in results:
            torch.testing.assert_close(result["scores"][name], expected, **TOL)


def _disagree_on_rank(rank, world_size):
    config = SMTConfig(block_size=16, num_blocks=2 + rank, warmup_steps=1)
    scores = {"a.v_proj": torch.arange(8.0).view(2, 4)}
    with pytest.raises(ValueError, match=r"Ranks disagree on the selected blocks \(digest\) \(ranks 0 have"):
        check_same_selection(select_blocks(scores, config))


def test_ranks_that_disagree_fail_loudly():
    run_on_ranks(_disagree_on_rank, 2)
