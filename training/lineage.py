"""The base model a model directory descends from, read from the files a run writes beside the weights.

No torch here: the web process checks a reward model against the policy before it queues a run.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_FILE = "training_config.json"


def base_model_of(model: str) -> str:
    """The base model ``model`` was trained from, through every version in between.

    A directory a run wrote records it as ``origin_model`` in its ``training_config.json`` (an
    older one only as ``base_model``, the model that run started from, which is followed); any
    other model is its own base: a local directory by its absolute path, else its hub name.
    """
    path = Path(model).expanduser()
    if not path.exists():
        return model
    config_file = path / CONFIG_FILE
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("origin_model"):
        return str(config["origin_model"])
    if config.get("base_model") and Path(config["base_model"]).expanduser().resolve() != path.resolve():
        return base_model_of(str(config["base_model"]))
    return str(path.resolve())
