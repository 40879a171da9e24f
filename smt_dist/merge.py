"""``python -m smt_dist.merge``: the streaming merge of ``smt_dist.files.merge``, by its documented name."""

import sys

from smt_dist.files.merge import main, merge_checkpoint

__all__ = ["main", "merge_checkpoint"]

if __name__ == "__main__":
    sys.exit(main())
