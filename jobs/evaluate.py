"""Entry point for `ray job submit -- python jobs/evaluate.py --bench ... --model ... --out ...`.

The same arguments as `r2ray evaluate`; all the work is in :func:`r2ray.evaluation.run.evaluate_uris`.
"""

import sys

from r2ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
