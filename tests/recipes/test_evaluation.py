"""Answer extraction on hand-written responses of every dataset's format, and launch/eval.py.

The expected predictions are read off each response by hand, following LLM-Adapters' evaluators:
the first answer word (commonsense), the last number with commas removed (math, within 0.001),
the first capital A-E (AQuA). Wrong and unparseable responses must score as wrong.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from distributed_utils import free_port, run_command

from smt_dist.recipes.evaluation import DATASETS, extract_answer, is_correct, read_test_file

REPO = Path(__file__).resolve().parents[2]
EVAL = REPO / "launch" / "eval.py"
MODEL = REPO / "models" / "tiny-llama"

# dataset, response, the prediction read by hand, the record's answer, correct?
CASES = [
    ("boolq", "the correct answer is true", "true", "true", True),
    ("boolq", "false. It is not true that ...", "false", "true", False),  # the first word counts
    ("boolq", "I am not sure", "", "false", False),
    ("piqa", "the correct answer is solution2", "solution2", "solution2", True),
    ("social_i_qa", "the correct answer is answer3", "answer3", "answer1", False),
    ("hellaswag", "the correct answer is ending4", "ending4", "ending4", True),
    ("winogrande", "the correct answer is option1 or option2", "option1", "option1", True),
    ("arc-challenge", "the correct answer is answer5", "answer5", "answer5", True),
    ("arc-easy", "The correct answer is Answer2", "", "answer2", False),  # case matters, as theirs
    ("openbookqa", "answer1", "answer1", "answer4", False),
    ("tiny_facts", "the correct answer is answer2", "answer2", "answer2", True),
    ("gsm8k", "She has 3 + 4 = 7 apples. The answer is 1,234", 1234.0, "1234", True),
    ("gsm8k", "The answer is 7.0004", 7.0004, "7", True),  # within 0.001
    ("gsm8k", "The answer is 7.01", 7.01, "7", False),
    ("svamp", "so -5.5 is the change", -5.5, "-5.5", True),
    ("multiarith", "no idea", math.inf, "3", False),
    ("addsub", "12 then 13", 13.0, "12", False),  # the last number counts
    ("singleeq", "x = 4", 4.0, "4.0", True),
    ("tiny_arith", "Tom has 9 - 4 = 5 birds left. The answer is 5", 5.0, "5", True),
    ("aqua", "The answer is B, not C", "B", "B", True),
    ("aqua", "the answer is (e)", "", "E", False),
]


@pytest.mark.parametrize(("dataset", "response", "prediction", "answer", "correct"), CASES)
def test_extraction(dataset, response, prediction, answer, correct):
    got = extract_answer(dataset, response)
    assert got == prediction
    assert is_correct(dataset, got, answer) is correct


def test_every_dataset_has_a_case():
    assert {case[0] for case in CASES} == set(DATASETS)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not valid JSON"),
        ("[]", "non-empty JSON list"),
        ('[{"answer": "1"}]', "record 0 lacks a non-empty string 'instruction'"),
        ('[{"instruction": "q"}]', "record 0 lacks its 'answer'"),
        ('[{"instruction": "q", "answer": "seven"}]', "non-numeric answer 'seven'"),
    ],
)
def test_bad_test_files_get_one_sentence(tmp_path, content, message):
    path = tmp_path / "test.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_test_file(path, "gsm8k")


@pytest.mark.parametrize(
    ("answers", "responses", "flags"),
    [
        (["3", "12"], ["So 3.", "It is 11 or 12"], [True, True]),  # math: the last number
        (["answer2", "answer1"], ["the correct answer is answer2", "answer3, not answer1"], [True, False]),
        (["option1", "option3"], ["option3", "option3"], [False, True]),
        (["true", "false"], ["false, I think", "false"], [False, True]),
        (["B", "E"], ["B", "Answer: D"], [True, False]),  # AQuA: the first capital A-E
    ],
)
def test_a_new_task_is_read_by_its_layout(tmp_path, answers, responses, flags):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([{"instruction": f"q{i}", "answer": a} for i, a in enumerate(answers)]))
    name = f"held_back_{tmp_path.name}"  # a name no rule knows
    records = read_test_file(path, name)
    got = [
        is_correct(name, extract_answer(name, r), rec["answer"])
        for r, rec in zip(responses, records, strict=True)
    ]
    assert got == flags


def test_unknown_dataset_exits_with_one_sentence(tmp_path):
    path = tmp_path / "test.json"
    path.write_text('[{"instruction": "q", "answer": "a cat"}]')  # no layout tells how to read it
    result = run_command(
        [sys.executable, str(EVAL), "--model_name_or_path", str(MODEL), "--test_file", f"mmlu={path}",
         "--output_dir", str(tmp_path / "out")],
        cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"eval.py: error: Unknown dataset 'mmlu'; known: {', '.join(DATASETS)} (or any task whose test "
        "file's answers are numbers, letters A-E, true/false or options like answer1)."
    ]
    assert not (tmp_path / "out").exists()


def test_a_model_folder_without_safetensors_is_refused_unread(tmp_path):
    """Only a pickled ``.bin`` beside the config: never unpickled, one sentence instead."""
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes((MODEL / name).read_bytes())
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle anyone should load")
    result = run_command(
        [sys.executable, str(EVAL), "--model_name_or_path", str(model), "--data_dir",
         str(REPO / "data" / "tiny_eval"), "--output_dir", str(tmp_path / "out")],
        cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"eval.py: error: {model} holds no safetensors weights (model.safetensors or "
        "model.safetensors.index.json); save the model with save_pretrained(safe_serialization=True)."
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_ranks_give_the_same_predictions_as_one(tmp_path):
    """Each rank answers a slice; gathered, they must equal one process's answers record for record."""
    common = ["--model_name_or_path", str(MODEL), "--data_dir", str(REPO / "data" / "tiny_eval"),
              "--limit", "24", "--per_device_eval_batch_size", "5", "--disable_tqdm"]  # fmt: skip
    one = run_command(
        [sys.executable, str(EVAL), *common, "--output_dir", str(tmp_path / "one")],
        cwd=REPO, timeout=600,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_command(
        ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), str(EVAL), *common,
         "--output_dir", str(tmp_path / "two")],
        cwd=REPO, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    accuracy = [json.loads((tmp_path / run / "accuracy.json").read_text()) for run in ("one", "two")]
    assert accuracy[0] == accuracy[1] and set(accuracy[0]) == {"tiny_facts", "tiny_arith"}
    for name in accuracy[0]:
        rows = [
            (tmp_path / run / f"{name}_predictions.jsonl").read_text().splitlines() for run in ("one", "two")
        ]
        assert len(rows[0]) == 24
        # Left padding differs between slices (another batch, another longest prompt); greedy
        # answers of a model this confident do not, so the responses are compared exactly.
        assert [json.loads(r)["output_pred"] for r in rows[0]] == [
            json.loads(r)["output_pred"] for r in rows[1]
        ]
