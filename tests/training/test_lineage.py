"""The base model a model directory descends from, as the online runs check it against their reward model."""

import json

from training.lineage import base_model_of


def test_a_model_nobody_trained_here_is_its_own_base(tmp_path):
    (tmp_path / "base").mkdir()
    assert base_model_of("Org/some-model") == "Org/some-model"
    assert base_model_of(str(tmp_path / "base")) == str((tmp_path / "base").resolve())


def test_a_version_leads_back_to_the_base_its_line_started_from(tmp_path):
    base, v1, v2 = tmp_path / "base", tmp_path / "v1", tmp_path / "v2"
    for folder in (base, v1, v2):
        folder.mkdir()
    # A directory from before origin_model was recorded: followed through base_model.
    (v1 / "training_config.json").write_text(json.dumps({"algorithm": "dpo", "base_model": str(base)}))
    (v2 / "training_config.json").write_text(json.dumps({"algorithm": "ppo", "base_model": str(v1)}))
    assert base_model_of(str(v2)) == str(base.resolve())
    (v2 / "training_config.json").write_text(json.dumps({"base_model": str(v1), "origin_model": "Org/other"}))
    assert base_model_of(str(v2)) == "Org/other"
