"""Ray job: every method from one base on one dataset, evaluated alike; writes the report.

    ray job submit --working-dir . -- python jobs/compare.py \
        --config jobs/configs/compare_llava7b.yaml --out /mnt/shared/runs/compare
"""

import sys

from nsft_ray.cli import run

if __name__ == "__main__":
    run(["compare", *sys.argv[1:]])
