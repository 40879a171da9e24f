"""Jobs that read top to bottom: ``finetune`` (``launch/train.py``) and ``evaluate``
(``launch/eval.py``), with their arguments, data, checkpoints, logs and memory report."""
