"""Preference training with plain torch and transformers: data, log-probs, DPO and GRPO, sampling.

PyTorch's OpenMP threads wait for work by spinning, by default for a few milliseconds. A
short spin keeps a training step fast, since the next operation follows within microseconds;
long spins, when other processes share the cores (a web server, a worker and a test run on
two cores), take the CPU time those processes need and slow everything down many times over.
So a waiting thread spins for 3,000 turns of its wait loop (tens of microseconds) and then
sleeps. This must happen before torch is first imported; an ``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` already in the environment wins (``OMP_WAIT_POLICY=PASSIVE``: never spin).
"""

import os

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")
