"""The Ray layer: Ray Data readers, Ray Train launch, PPO roles, Ray Data evaluation.

Ray Data configures its loggers when it is first imported, so the quiet-console config is set
here, before any module of this package imports ray.data (see runtime.py).
"""

import os
from pathlib import Path

os.environ.setdefault("RAY_DATA_LOGGING_CONFIG",
                      str(Path(__file__).with_name("ray_data_logging.yaml")))
