import os
from pathlib import Path

import pytest
import torch

from tests.tiny_model import make_tiny_model_dir

# Tiny models gain nothing from intra-op threads, and spinning threads lose badly when
# the suite shares the CPU with other processes.
torch.set_num_threads(1)

REAL_MODEL_DIR = Path(__file__).resolve().parents[2] / "var/models/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved once per session; tests must not write into it."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def real_model_dir() -> Path:
    path = Path(os.environ.get("RANKWISE_BASE_MODEL", REAL_MODEL_DIR))
    if not (path / "config.json").is_file():
        pytest.skip(f"the default model is not at {path} (run `python manage.py fetch_default_model`)")
    return path
