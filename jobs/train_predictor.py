"""Entry point for `ray job submit -- python jobs/train_predictor.py --bench ... --register ...`.

The same arguments as `r2ray train`; all the work is in :func:`r2ray.training.train_predictor_job`.
"""

import sys

from r2ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
