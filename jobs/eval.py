"""Ray job: evaluate an exported model folder on the ShapesWorld eval split.

    ray job submit --working-dir . -- python jobs/eval.py \
        --model /mnt/shared/runs/nsft/model --data /mnt/shared/data/world
"""

import sys

from nsft_ray.cli import run

if __name__ == "__main__":
    run(["eval", *sys.argv[1:]])
