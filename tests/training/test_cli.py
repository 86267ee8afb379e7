import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.synthetic import less_likely_pairs, preference_pairs, ranked_groups
from training.__main__ import build_parser, config_from_args, main
from training.config import DPOConfig, GRPOConfig

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--min-steps",
    "0",
    "--max-length",
    "64",
    "--max-prompt-length",
    "48",
    "--lr",
    "1e-3",
    "--batch-size",
    "8",
    "--quiet",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dpo_end_to_end(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs())
    out = tmp_path / "out"
    code = main(["dpo", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(out), *TINY])
    assert code == 0
    text = capsys.readouterr().out
    assert "steps:" in text and "held-out accuracy" in text and str(out) in text
    assert float(text.split("implicit-reward accuracy ")[1].split(",")[0]) >= 0.9
    assert (out / "adapter_model.safetensors").is_file()


def test_training_makes_the_chosen_answer_more_likely(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", less_likely_pairs())
    args = ["--data", str(data), "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"), "--save-every", "0"]
    code = main(["dpo", *args, *TINY, "--lr", "1e-2", "--batch-size", "4", "--warmup-ratio", "0"])
    assert code == 0
    before, after = capsys.readouterr().out.split("chosen answer more likely: ")[1].split(";")[0].split(" -> ")
    assert float(before) <= 0.25 and float(after) >= 0.9


def test_max_prompt_length_left_out_follows_max_length(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(4))
    out = tmp_path / "out"
    code = main(["dpo", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(out), "--max-length", "96"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "training_config.json").read_text())["max_prompt_length"] == 48
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "dpo",
            "--data",
            "x.jsonl",
            "--model",
            "m",
            "--out",
            "o",
            "--max-length",
            "256",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert "max_prompt_length" not in result.stderr and "x.jsonl: no such file" in result.stderr


def test_grpo_end_to_end_with_parquet_and_separate_eval_file(tmp_path, tiny_model_dir, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    groups = ranked_groups()
    pq.write_table(pa.Table.from_pylist(groups[:-9]), tmp_path / "train.parquet")
    held = write_jsonl(tmp_path / "held.jsonl", groups[-9:])
    out = tmp_path / "g"
    code = main(
        ["grpo", "--data", str(tmp_path / "train.parquet"), "--eval-data", str(held), "--model", str(tiny_model_dir)]
        + ["--out", str(out), "--full", "--lr", "5e-4", "--num-iterations", "2", *TINY[:4], "--quiet"]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "held-out accuracy (27 pairs" in text and "Kendall tau with the human ranks (9 groups)" in text
    assert (out / "model.safetensors").is_file()


def test_missing_file_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    code = main(["dpo", "--data", str(tmp_path / "nope.jsonl"), "--model", str(tiny_model_dir), "--out", "x"])
    assert code == 1
    assert "nope.jsonl: no such file" in capsys.readouterr().err


def test_wrong_format_names_the_line(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "groups.jsonl", ranked_groups(4))
    code = main(["dpo", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "line 1: missing field 'chosen'" in err or "line 2: missing field 'chosen'" in err
    assert not (tmp_path / "o").exists()


def test_a_model_that_cannot_be_loaded_is_a_clear_error(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(4))
    code = main(["dpo", "--data", str(data), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")])
    assert code == 1
    assert "no-model' does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--full", "--merge-lora"], "merge_lora needs lora"),
        (["--loss-type", "hinge", "--label-smoothing", "0.1"], "label_smoothing has no effect"),
        (["--eval-data", "x.jsonl", "--eval-fraction", "0.2"], "cannot be used together"),
        (["--max-prompt-length", "600"], "max_prompt_length must be"),
        (["--beta", "nan"], "beta must be a finite number, not nan"),
        (["--lr", "inf"], "learning_rate must be a finite number, not inf"),
        (["--max-length", "1"], "max_prompt_length must be positive and smaller than max_length"),
    ],
)
def test_options_that_make_no_sense_together(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["dpo", "--data", "d.jsonl", "--model", "m", "--out", "o", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_documents_every_option():
    parser = build_parser()
    [subparsers] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for algorithm, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help and len(action.help.split()) >= 2, f"{algorithm} {action.option_strings} has no help"
    result = subprocess.run(
        [sys.executable, "-m", "training", "grpo", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "--num-iterations" in result.stdout and "--lora" in result.stdout and "--full" in result.stdout


@pytest.mark.parametrize("algorithm", ["dpo", "grpo"])
def test_config_arguments_give_the_config_back(algorithm):
    from training.config import config_arguments

    config_class = {"dpo": DPOConfig, "grpo": GRPOConfig}[algorithm]
    changed = {"lora": False, "learning_rate": 3.3e-7, "batch_size": 3, "lr_scheduler": "linear", "seed": 7}
    changed |= {"beta": 0.25, "share_prompt": False} | ({"epsilon_high": 0.28} if algorithm == "grpo" else {})
    config = config_class(**changed)
    args = build_parser().parse_args(
        [algorithm, "--data", "d", "--model", "m", "--out", "o", *config_arguments(config)]
    )
    assert config_from_args(args) == config


def test_a_stop_file_stops_the_run_before_its_first_step_and_writes_no_model(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(4))
    stop = tmp_path / "stop"
    stop.touch()
    out = tmp_path / "out"
    code = main(
        ["dpo", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(out), "--stop-file", str(stop)]
    )
    assert code == 0
    assert f"stopped: {stop} appeared; no model written" in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.parametrize("algorithm", ["ppo", "grpo_online"])
def test_online_algorithms_take_their_prompts_as_prompts_or_data(algorithm, capsys):
    rest = ["--reward-model", "rm", "--model", "m", "--out", "o"]
    for option in ("--prompts", "--data"):
        assert build_parser().parse_args([algorithm, option, "p.jsonl", *rest]).data == Path("p.jsonl")
    with pytest.raises(SystemExit):
        build_parser().parse_args([algorithm, "--help"])
    assert f"python -m training {algorithm} [-h] --prompts FILE" in capsys.readouterr().out


def test_offline_algorithms_take_no_prompts_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dpo", "--prompts", "p.jsonl", "--model", "m", "--out", "o"])
    assert "--data" in capsys.readouterr().err
