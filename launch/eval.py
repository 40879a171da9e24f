#!/usr/bin/env python
"""Accuracy on LLM-Adapters test sets: the recipe ``smt_dist.recipes.evaluate``, under any launcher.

    python launch/eval.py --model_name_or_path models/tiny-llama --adapter runs/smt/adapter \
        --data_dir data/tiny_eval --output_dir runs/smt/eval
"""

import sys

from smt_dist.recipes.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
