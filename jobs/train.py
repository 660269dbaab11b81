"""Ray job: train one algorithm (sft, nsft) on Ray Train + DeepSpeed.

    ray job submit --working-dir . -- python jobs/train.py --algo nsft \
        --config jobs/configs/tiny/nsft.yaml run.dir=/mnt/runs/nsft
"""

import sys

from nsft_ray.cli import run

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])
