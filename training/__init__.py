"""Preference training with plain torch and transformers: data, log-probs, DPO and GRPO, sampling.

PyTorch's OpenMP threads spin while they wait for work. When other processes share the
cores (a web server, a worker and a test run on two cores), spinning threads slow each
other down many times over, so they are told to sleep instead. This must happen before
torch is first imported; a value already in the environment wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
