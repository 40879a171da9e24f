"""Where the repository's shipped files are, wherever pytest was started from."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "tiny-llama"
DATA = REPO / "data" / "tiny_instruct.jsonl"
EVAL_DATA = REPO / "data" / "tiny_eval"
