"""Settings for benchmarks/annotate_speed.py: the production settings without the submit throttle.

The throttle (120 judgements a minute per user) is a limit for people; the benchmark's
simulated annotators submit as fast as the server answers.
"""

from config.settings import *  # noqa: F403
from config.settings import REST_FRAMEWORK

REST_FRAMEWORK = {
    **REST_FRAMEWORK,
    "DEFAULT_THROTTLE_RATES": {**REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "submit": None},
}
