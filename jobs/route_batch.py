"""Entry point for `ray job submit -- python jobs/route_batch.py --input ... --budget-usd ...`.

The same arguments as `r2ray route`; all the work is in :func:`r2ray.batch.route_batch`.
"""

import sys

from r2ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["route", *sys.argv[1:]]))
