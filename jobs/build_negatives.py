"""Ray job: turn preference Parquet into nSFT corrective conversations.

    ray job submit --working-dir . -- python jobs/build_negatives.py \
        --input /mnt/data/world/pref_train.parquet --out /mnt/data/negatives \
        --config jobs/configs/negatives_llm.yaml
"""

import sys

from nsft_ray.cli import run

if __name__ == "__main__":
    run(["build-negatives", *sys.argv[1:]])
