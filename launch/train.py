#!/usr/bin/env python
"""Fine-tune with SMT: the recipe ``smt_dist.recipes.finetune``, under any launcher.

deepspeed --num_gpus 2 launch/train.py --deepspeed configs/zero2_smt.json
torchrun --nproc_per_node 2 launch/train.py --backend fsdp
mpirun -n 2 python launch/train.py
"""

import faulthandler
import signal
import sys

from smt_dist.recipes.finetune import main

if __name__ == "__main__":
    # A rank that hangs (a peer gone, a collective never matched): `kill -USR1 <pid>` prints
    # where each of its threads waits to its stderr, and the run goes on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    sys.exit(main())
