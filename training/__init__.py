"""Preference training with plain torch and transformers: data, log-probs, DPO and GRPO, sampling.

PyTorch's OpenMP threads wait for work by spinning, by default for a few milliseconds. A
short spin keeps a training step fast, since the next operation follows within microseconds;
long spins, when other processes share the cores (a web server, a worker and a test run on
two cores), take the CPU time those processes need and slow everything down many times over.
So a waiting thread spins for 3,000 turns of its wait loop (tens of microseconds) and then
sleeps. This must happen before torch is first imported; an ``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` already in the environment wins (``OMP_WAIT_POLICY=PASSIVE``: never spin).

The setting is for CPU runs: where the process will see a GPU (``gpu_expected``, decided here
without importing torch) it is left out and OpenMP keeps its own default.
"""

import os
from collections.abc import Mapping, MutableMapping

NVIDIA_GPUS = "/proc/driver/nvidia/gpus"  # one entry per GPU the NVIDIA driver has


def gpu_expected(environ: Mapping[str, str] = os.environ, gpus: str = NVIDIA_GPUS) -> bool:
    """Whether this process will run on CUDA, told before torch is imported (so without asking it).

    True when the NVIDIA driver lists a GPU and ``CUDA_VISIBLE_DEVICES`` does not hide them all.
    ``training.models.default_device`` asks torch itself; the two differ only where a CPU build of
    torch meets a GPU (then the spin is left at OpenMP's default) or a GPU this check does not know.
    """
    if environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return False
    try:
        return bool(os.listdir(gpus))
    except OSError:
        return False


def set_thread_spin(environ: MutableMapping[str, str], *, gpu: bool) -> None:
    """A short OpenMP spin for a CPU run, unless the environment already chose one."""
    if not gpu and "OMP_WAIT_POLICY" not in environ:
        environ.setdefault("GOMP_SPINCOUNT", "3000")


set_thread_spin(os.environ, gpu=gpu_expected())
