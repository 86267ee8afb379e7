from pathlib import Path

import pytest
import torch

from tests.tiny_model import make_tiny_model_dir

# Tiny models gain nothing from intra-op threads, and spinning threads lose badly when
# the suite shares the CPU with other processes.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved once per session; tests must not write into it."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")
