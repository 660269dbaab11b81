"""Ray job: write ShapesWorld datasets.

    ray job submit --working-dir . -- python jobs/world.py \
        --out /mnt/shared/data/world --config jobs/configs/tiny/world.yaml
"""

import sys

from nsft_ray.cli import run

if __name__ == "__main__":
    run(["world", *sys.argv[1:]])
