#!/usr/bin/env python
"""Fine-tune with SMT: the recipe ``smt_dist.recipes.finetune``, under any launcher.

deepspeed --num_gpus 2 launch/train.py --deepspeed configs/zero2_smt.json
torchrun --nproc_per_node 2 launch/train.py --backend fsdp
mpirun -n 2 python launch/train.py
"""

import sys

from smt_dist.recipes.finetune import main

if __name__ == "__main__":
    sys.exit(main())
