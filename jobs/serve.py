"""Ray job: host exported models over OpenAI-compatible HTTP with Ray Serve (blocks).

    ray job submit --working-dir . -- python jobs/serve.py \
        --model base=/mnt/shared/demo/models/base --model nsft=/mnt/shared/demo/models/nsft
"""

import sys

from nsft_ray.cli import run

if __name__ == "__main__":
    run(["serve", *sys.argv[1:]])
