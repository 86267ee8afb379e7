"""The reward model, PPO and online GRPO against TRL's trainers on the same data, model and reward model.

    python benchmarks/rl_vs_trl.py reward [--pairs 32]
    python benchmarks/rl_vs_trl.py ppo --reward-model DIR --trl-ppo DIR [--prompts 16]
    python benchmarks/rl_vs_trl.py grpo --reward-model DIR [--prompts 16]

Needs the `bench` extra (trl, datasets). ``--reward-model`` is any reward model ``python -m training
reward`` trained on the default model (benchmarks/algorithms.py leaves one in its work directory).
TRL 1.16 no longer has a PPO trainer (``trl.experimental.ppo`` was removed in 1.13), so ``ppo`` needs
TRL 1.12.0 in a directory of its own, put in front of the path only for TRL's processes:
``pip install --no-deps --target DIR trl==1.12.0``; everything else is the installed TRL.

Each engine runs in a fresh Python process; the parent reports wall time, CPU time and peak memory
of each (``measured.run_measured``) and what the child measured inside:

- ``reward``: TRL's ``RewardTrainer`` and ``train_reward`` at matched settings (full fine-tuning,
  fp32, TRL's learning rate 1e-4, linear schedule without warmup, clipping at 1.0, AdamW, batch 4
  pairs, one epoch) on the same token ids (TRL is given them pre-tokenized), and ours with its defaults
  (LoRA, precision auto). Throughput is pairs and tokens a second. The first-step loss is compared
  in one more process where both take one step on the same four pairs from the same initial head
  (ours, as ``train_reward`` draws it, copied into TRL's ``score`` layer). TRL's tokenizer is given
  ``<|endoftext|>`` as its padding token: with this model's own (the EOS), TRL's sequence
  classifier reads each score at the token before the final EOS, ours at the EOS.
- ``ppo``: TRL's ``PPOTrainer`` (a value model of its own, the reward model converted to a sequence
  classifier with our head) and ``train_ppo``, matched (full fine-tuning, fp32, 8 prompts a rollout
  batch, 4 PPO epochs of one minibatch, k3 KL at 0.05, rewards whitened, temperature 1, no gradient
  clipping: TRL's PPO loop has none) and ours with defaults. The first-update loss from the same
  rollouts: ours sampled, then fed to both loops (TRL's ``batch_generation`` and our
  ``sample_and_score`` replaced by the fixed samples), each computing everything after sampling
  (reference and old log-probs, values, scores, KL, whitening, GAE, the clipped losses) its own way.
- ``grpo``: TRL's ``GRPOTrainer`` and ``train_grpo_online``, matched (full fine-tuning, fp32, 2
  prompts x 4 completions, 2 iterations a batch, β 0.04, loss ``grpo``, group scaling, temperature
  1), scoring with our reward model (TRL through a reward function that calls it on the sampled ids),
  and ours with defaults. The loss from the same rollouts: one of ours, then TRL's
  ``_compute_loss`` and our ``grpo_loss`` on the same model, before and after one optimizer step.

Rollout time is sampling plus the passes without gradient each loop runs on a batch before its
updates (the reward model, the reference, and TRL's value model and old log-probs where it runs a pass
for them; our loops take old log-probs and values from the batch's first update pass); update time is
the rest of the training loop. Rollout tokens are the
completion tokens sampled (up to and including EOS); update tokens are prompt + completion tokens
times the optimizer steps taken on them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpo_vs_trl import make_pairs  # noqa: E402
from measured import run_measured  # noqa: E402

DEFAULT_MODEL = ROOT / "var/models/SmolLM2-135M-Instruct"
DEMO_PROMPTS = ROOT / "feedback/demo/prompts.jsonl"
TRL_PAD = "<|endoftext|>"  # a padding token that is not the EOS and never occurs in the data
REWARD_BATCH, REWARD_LR, MAX_LENGTH = 4, 1e-4, 256
PPO_BATCH, PPO_EPOCHS, RL_LR, NEW_TOKENS = 8, 4, 1e-6, 48
GRPO_PROMPTS, GRPO_K, GRPO_ITERATIONS, GRPO_BETA = 2, 4, 2, 0.04


def demo_prompts(count: int) -> list[Any]:
    rows = [json.loads(line)["prompt"] for line in DEMO_PROMPTS.read_text().splitlines() if line.strip()]
    return rows[:count]


# ------------------------------------------------------------------------ reward model


def reward_config(mode: str) -> Any:
    from training.config import RewardConfig

    if mode == "matched":
        return RewardConfig(
            lora=False,
            precision="fp32",
            learning_rate=REWARD_LR,
            warmup_ratio=0.0,
            lr_scheduler="linear",
            batch_size=REWARD_BATCH,
            max_length=MAX_LENGTH,
            save_every=0,
        )
    return RewardConfig(batch_size=REWARD_BATCH, max_length=MAX_LENGTH)


def initial_head(model: str) -> Any:
    """The head ``train_reward`` starts from under the matched config: the same seeded calls in the same order."""
    from training.reward import new_head
    from training.runs import load_policy

    setup = load_policy(reward_config("matched"), model)
    return new_head(setup.model).weight.detach().clone()


def tokenized_pairs(model: str, rows: list[dict]) -> list[Any]:
    from training.data import tokenize_pairs
    from training.models import load_model

    _, tokenizer = load_model(model)
    return tokenize_pairs(rows, tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_LENGTH // 2).examples


def trl_reward_trainer(model: str, rows: list[dict], head: Any, out: str) -> Any:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.pad_token = TRL_PAD
    classifier = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    classifier.score.weight.data.copy_(head)
    data = Dataset.from_list(
        [{"chosen_ids": p.prompt_ids + p.chosen_ids, "rejected_ids": p.prompt_ids + p.rejected_ids} for p in rows]
    )
    args = RewardConfig(
        output_dir=out,
        per_device_train_batch_size=REWARD_BATCH,
        num_train_epochs=1,
        max_length=MAX_LENGTH,
        learning_rate=REWARD_LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
    )
    return RewardTrainer(model=classifier, args=args, train_dataset=data, processing_class=tokenizer)


def child_reward(engine: str, model: str, data_file: Path) -> dict:
    rows = json.loads(data_file.read_text())
    pairs = tokenized_pairs(model, rows)
    tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    if engine == "trl":
        with tempfile.TemporaryDirectory() as out:
            trainer = trl_reward_trainer(model, pairs, initial_head(model), out)
            started = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - started
        first = next(log for log in trainer.state.log_history if "loss" in log)["loss"]
        return {"train_seconds": seconds, "first_loss": first, "pairs": len(pairs), "tokens": tokens}
    from training.reward import train_reward

    losses: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = train_reward(
            reward_config(engine),
            train_examples=rows,
            eval_examples=[],
            model=model,
            out_dir=Path(out) / "rm",
            progress=lambda step, total, metrics: losses.append(metrics["loss"]),
        )
        seconds = time.perf_counter() - started
    return {
        "train_seconds": seconds,
        "loop_seconds": result.metrics["train_seconds"],
        "first_loss": losses[0],
        "pairs": len(pairs),
        "tokens": tokens,
        "precision": result.metrics["precision"],
    }


def child_reward_loss(model: str, data_file: Path) -> dict:
    """One step of each on the same four pairs from the same head: the first-step losses."""
    from training.reward import train_reward

    rows = json.loads(data_file.read_text())[:REWARD_BATCH]
    ours: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        train_reward(
            reward_config("matched"),
            train_examples=rows,
            eval_examples=[],
            model=model,
            out_dir=Path(out) / "rm",
            progress=lambda step, total, metrics: ours.append(metrics["loss"]),
        )
        trainer = trl_reward_trainer(model, tokenized_pairs(model, rows), initial_head(model), out)
        trainer.train()
    trl = next(log for log in trainer.state.log_history if "loss" in log)["loss"]
    return {"ours": ours[0], "trl": trl}


def report_reward(results: dict[str, dict]) -> None:
    print("| run | wall | CPU | peak RSS | pairs/s (wall) | tokens/s in train() | first-step loss | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, r in results.items():
        if name == "loss":
            continue
        print(
            f"| {name} | {r['wall_seconds']:.1f} s | {r['cpu_seconds']:.1f} s | {r['peak_rss_mb']:.0f} MB | "
            f"{r['pairs'] / r['wall_seconds']:.2f} | {r['tokens'] / r['train_seconds']:.0f} | {r['first_loss']:.6f} | "
            f"{r['load_before']} -> {r['load_after']} |"
        )
    trl = results.get("trl")
    for name in ("ours-matched", "ours-default"):
        if trl and name in results:
            r = results[name]
            print(
                f"\n{name}: {trl['wall_seconds'] / r['wall_seconds']:.2f}x TRL's pairs/s (whole process, wall), "
                f"{trl['cpu_seconds'] / r['cpu_seconds']:.2f}x per CPU second, "
                f"{trl['train_seconds'] / r['train_seconds']:.2f}x inside train()"
            )
    if "loss" in results:
        loss = results["loss"]
        print(
            f"\nfirst-step loss on the same 4 pairs from the same head: ours {loss['ours']:.7f}, "
            f"TRL {loss['trl']:.7f}, difference {abs(loss['ours'] - loss['trl']):.2e}"
        )


# ---------------------------------------------------------------------------- shared


class Clock:
    """Wall and CPU seconds of a training loop and of its rollouts, and the tokens of each, counted by
    wrappers around each engine's functions. CPU seconds are this process's (all its threads): on a
    shared machine they move less with the load than wall seconds do."""

    def __init__(self) -> None:
        self.rollout_wall = self.rollout_cpu = 0.0
        self.rollout_tokens = self.update_tokens = 0
        self.started = (0.0, 0.0)
        self.train_wall = self.train_cpu = 0.0

    def start(self) -> None:
        self.started = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        self.train_wall = time.perf_counter() - self.started[0]
        self.train_cpu = time.process_time() - self.started[1]

    def timed(self, fn: Any, *, only_without_grad: bool = False) -> Any:
        import torch

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if only_without_grad and torch.is_grad_enabled():
                return fn(*args, **kwargs)
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.rollout_wall += time.perf_counter() - wall
                self.rollout_cpu += time.process_time() - cpu

        return wrapper

    def around_loop(self, module: Any) -> None:
        """Start the clock when ``module``'s loop has its optimizer (start_optimization), stop it at finish_run."""
        start_optimization, finish_run = module.start_optimization, module.finish_run

        def started(*args: Any, **kwargs: Any) -> Any:
            out = start_optimization(*args, **kwargs)
            self.start()
            return out

        def finished(*args: Any, **kwargs: Any) -> Any:
            self.stop()
            return finish_run(*args, **kwargs)

        module.start_optimization, module.finish_run = started, finished

    def result(self) -> dict:
        update_wall, update_cpu = self.train_wall - self.rollout_wall, self.train_cpu - self.rollout_cpu
        return {
            "train_seconds": self.train_wall,
            "train_cpu_seconds": self.train_cpu,
            "rollout_seconds": self.rollout_wall,
            "rollout_cpu_seconds": self.rollout_cpu,
            "update_seconds": update_wall,
            "update_cpu_seconds": update_cpu,
            "rollout_tokens": self.rollout_tokens,
            "update_tokens": self.update_tokens,
            "rollout_tokens_per_second": self.rollout_tokens / self.rollout_wall,
            "update_tokens_per_second": self.update_tokens / update_wall,
            "rollout_tokens_per_cpu_second": self.rollout_tokens / self.rollout_cpu,
            "update_tokens_per_cpu_second": self.update_tokens / update_cpu,
        }


def completion_lengths(responses: Any, eos_id: int) -> Any:
    """(B,) tokens of each response up to and including its first EOS (all of it when it has none)."""
    import torch

    is_eos = responses == eos_id  # (B, T)
    whole = torch.full((responses.shape[0],), responses.shape[1], device=responses.device)
    return torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, whole)


def trl_classifier(model: str, reward_model: str | None) -> Any:
    """A sequence classifier of the base model: our reward model's body and head, or a zero head (TRL's value model)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, dtype=torch.float32)
    if reward_model is None:
        torch.nn.init.zeros_(classifier.score.weight)  # values start at 0, as our value head does
        return classifier
    from training.reward import load_reward_model

    ours, _ = load_reward_model(reward_model)
    classifier.model.load_state_dict(ours.lm.model.state_dict())
    classifier.score.weight.data.copy_(ours.head.weight)
    return classifier


def prompt_ids(tokenizer: Any, prompts: list[Any]) -> list[list[int]]:
    from training.data import encode_prompt, prompt_messages

    return [encode_prompt(tokenizer, prompt_messages(p)) for p in prompts]


# ------------------------------------------------------------------------------- PPO


def ppo_config(mode: str, reward_model: str, **overrides: Any) -> Any:
    from training.config import PPOConfig

    sampling = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": NEW_TOKENS}
    if mode == "matched":
        return PPOConfig(
            lora=False,
            precision="fp32",
            learning_rate=RL_LR,
            warmup_ratio=0.0,
            lr_scheduler="linear",
            max_grad_norm=0.0,
            batch_size=PPO_BATCH,
            reward_model=reward_model,
            save_every=0,
            **sampling,
            **({"ppo_epochs": PPO_EPOCHS} | overrides),
        )
    return PPOConfig(batch_size=PPO_BATCH, reward_model=reward_model, **sampling, **overrides)


def trl_ppo_trainer(model: str, reward_model: str, prompts: list[Any], out: str, **overrides: Any) -> Any:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
    tokenizer.pad_token = TRL_PAD  # TRL's PPO masks every padding id: with the EOS it would mask the prompts' own
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    data = Dataset.from_list([{"input_ids": ids} for ids in prompt_ids(tokenizer, prompts)])
    settings: dict[str, Any] = {
        "per_device_train_batch_size": PPO_BATCH,
        "gradient_accumulation_steps": 1,
        "num_mini_batches": 1,
        "num_ppo_epochs": PPO_EPOCHS,
        "local_rollout_forward_batch_size": PPO_BATCH,
        "response_length": NEW_TOKENS,
        "temperature": 1.0,
        "stop_token": "eos",
        "kl_coef": 0.05,
        "kl_estimator": "k3",
        "whiten_rewards": True,
        "vf_coef": 0.1,
        "cliprange": 0.2,
        "cliprange_value": 0.2,
        "gamma": 1.0,
        "lam": 0.95,
        "learning_rate": RL_LR,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "total_episodes": len(prompts),
        "num_sample_generations": 0,
        "gradient_checkpointing": False,
        "bf16": False,
        "use_cpu": True,
        "save_strategy": "no",
        "report_to": "none",
        "logging_steps": 1,
        "seed": 0,
    }
    args = PPOConfig(output_dir=out, **(settings | overrides))
    return PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=trl_classifier(model, reward_model),
        value_model=trl_classifier(model, None),
        train_dataset=data,
    )


def child_ppo(engine: str, model: str, reward_model: str, count: int) -> dict:
    prompts = demo_prompts(count)
    clock = Clock()
    if engine == "trl":
        import torch
        from trl.experimental.ppo import ppo_trainer

        generate = ppo_trainer.batch_generation

        def counted_generation(*args: Any, **kwargs: Any) -> Any:
            query_responses, logits = generate(*args, **kwargs)
            queries = args[1]
            lengths = completion_lengths(query_responses[:, queries.shape[1] :], ppo_trainer_eos[0])
            clock.rollout_tokens += int(lengths.sum())
            clock.update_tokens += PPO_EPOCHS * (int((queries != pad_id[0]).sum()) + int(lengths.sum()))
            return query_responses, logits

        ppo_trainer.batch_generation = clock.timed(counted_generation)
        ppo_trainer.forward = clock.timed(ppo_trainer.forward, only_without_grad=True)
        ppo_trainer.get_reward = clock.timed(ppo_trainer.get_reward, only_without_grad=True)
        with tempfile.TemporaryDirectory() as out:
            trainer = trl_ppo_trainer(model, reward_model, prompts, out)
            ppo_trainer_eos, pad_id = [trainer.processing_class.eos_token_id], [trainer.processing_class.pad_token_id]
            torch.manual_seed(0)
            clock.start()
            trainer.train()
            clock.stop()
        return clock.result()

    import training.ppo as ppo

    roll_out = ppo._roll_out

    def counted_roll_out(*args: Any, **kwargs: Any) -> Any:
        rollout = roll_out(*args, **kwargs)
        clock.rollout_tokens += int(rollout.batch.completion_lengths.sum())
        clock.update_tokens += PPO_EPOCHS * rollout.batch.num_tokens
        return rollout

    ppo._roll_out = clock.timed(counted_roll_out)
    clock.around_loop(ppo)
    with tempfile.TemporaryDirectory() as out:
        result = ppo.train_ppo(
            ppo_config(engine, reward_model),
            train_examples=[{"prompt": p} for p in prompts],
            eval_examples=[],
            model=model,
            out_dir=Path(out) / "policy",
        )
    return clock.result() | {"precision": result.metrics["precision"]}


def fixed_rollouts(model: str, reward_model: str, count: int) -> tuple[list[Any], list[list[int]], list[float]]:
    """PPO_BATCH prompts whose one sampled completion the length limit cut, with our reward model's scores.

    Cut completions have no EOS, and only there do the two loops put a sequence's end in the same place:
    TRL adds the score one position after an EOS-ended response, ours at its EOS.
    """
    from training.generate import SamplingConfig
    from training.models import load_model
    from training.reward import load_reward_model
    from training.rollouts import sample_and_score

    policy, tokenizer = load_model(model)
    scorer, _ = load_reward_model(reward_model)
    prompts = demo_prompts(count)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=NEW_TOKENS, seed=0)
    samples = sample_and_score(
        policy, scorer, tokenizer, prompts, k=1, sampling=sampling, batch_size=16, precision="fp32", share_prompt=True
    )
    keep = [i for i, c in enumerate(samples.completions) if len(c) == NEW_TOKENS][:PPO_BATCH]
    if len(keep) < PPO_BATCH:
        raise SystemExit(f"only {len(keep)} of {count} prompts had a completion cut at {NEW_TOKENS} tokens")
    return (
        [prompts[i] for i in keep],
        [samples.completions[i] for i in keep],
        [float(samples.rewards[i, 0]) for i in keep],
    )


def child_ppo_loss(model: str, reward_model: str, count: int) -> dict:
    """The losses of the first two updates (PPO epochs) of one rollout batch, both loops fed the same rollouts."""
    import torch

    import training.ppo as ppo
    from training.data import prompt_key
    from training.rollouts import Samples

    prompts, completions, scores = fixed_rollouts(model, reward_model, count)
    by_prompt = {prompt_key(p): (c, s) for p, c, s in zip(prompts, completions, scores, strict=True)}

    def fixed_samples(policy: Any, scorer: Any, tokenizer: Any, batch: list[Any], **kwargs: Any) -> Samples:
        chosen = [by_prompt[prompt_key(p)] for p in batch]
        return Samples([c for c, _ in chosen], torch.tensor([[s] for _, s in chosen]))

    ppo.sample_and_score = fixed_samples
    ours: list[dict] = []
    with tempfile.TemporaryDirectory() as out:
        ppo.train_ppo(
            ppo_config("matched", reward_model, ppo_epochs=2),
            train_examples=[{"prompt": p} for p in prompts],
            eval_examples=[],
            model=model,
            out_dir=Path(out) / "policy",
            progress=lambda step, total, metrics: ours.append(metrics),
        )

    from trl.experimental.ppo import ppo_trainer

    trl_scores: list[float] = []
    get_reward = ppo_trainer.get_reward

    def recorded_reward(model_: Any, query_responses: Any, pad: int, context_length: int) -> Any:
        out = get_reward(model_, query_responses, pad, context_length)
        if model_ is trainer.reward_model:
            trl_scores.extend(out[1].tolist())
        return out

    def fixed_generation(policy: Any, queries: Any, batch_size: int, pad: int, config: Any) -> Any:
        tokenizer = trainer.processing_class
        responses = []
        for row in queries.tolist():
            prompt = tokenizer.decode([t for t in row if t != pad], skip_special_tokens=False)
            responses.append(by_text[prompt])
        query_responses = torch.cat([queries, torch.tensor(responses)], dim=1)
        with torch.no_grad():
            logits = ppo_trainer.forward(policy, query_responses, pad).logits[:, queries.shape[1] - 1 : -1]
        return query_responses, logits / (config.temperature + 1e-7)

    ppo_trainer.batch_generation = fixed_generation
    ppo_trainer.get_reward = recorded_reward
    losses = {}
    for epochs in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            trainer = trl_ppo_trainer(model, reward_model, prompts, out, num_ppo_epochs=epochs)
            tokenizer = trainer.processing_class
            by_text = {
                tokenizer.decode(ids): c for ids, c in zip(prompt_ids(tokenizer, prompts), completions, strict=True)
            }
            trl_scores.clear()
            trainer.train()
        log = next(entry for entry in trainer.state.log_history if "loss/policy_avg" in entry)
        losses[epochs] = {"policy": log["loss/policy_avg"], "value": log["loss/value_avg"]}
    # The logs average over the PPO epochs: the second epoch's loss is twice the two-epoch mean less the first.
    trl = [
        {name: losses[1][name] for name in ("policy", "value")},
        {name: 2 * losses[2][name] - losses[1][name] for name in ("policy", "value")},
    ]
    return {
        "ours": [{"policy": m["policy_loss"], "value": m["value_loss"], "loss": m["loss"]} for m in ours],
        "trl": [t | {"loss": t["policy"] + 0.1 * t["value"]} for t in trl],
        "score_difference": max(abs(a - b) for a, b in zip(sorted(trl_scores), sorted(scores), strict=True)),
        "completion_tokens": NEW_TOKENS,
    }


# ------------------------------------------------------------------------------ GRPO


def grpo_config(mode: str, reward_model: str, **overrides: Any) -> Any:
    from training.config import OnlineGRPOConfig

    sampling = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": NEW_TOKENS}
    if mode == "matched":
        return OnlineGRPOConfig(
            lora=False,
            precision="fp32",
            learning_rate=RL_LR,
            warmup_ratio=0.0,
            lr_scheduler="linear",
            max_grad_norm=1.0,
            batch_size=GRPO_PROMPTS,
            num_generations=GRPO_K,
            num_iterations=GRPO_ITERATIONS,
            reward_model=reward_model,
            save_every=0,
            **sampling,
            **({"beta": GRPO_BETA, "loss_type": "grpo"} | overrides),
        )
    return OnlineGRPOConfig(batch_size=GRPO_PROMPTS, reward_model=reward_model, **sampling, **overrides)


def trl_grpo_trainer(model: str, reward_model: str, prompts: list[Any], out: str, clock: Clock | None = None) -> Any:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from training.data import encode_prompt, prompt_messages
    from training.reward import load_reward_model, score_sequences

    tokenizer = AutoTokenizer.from_pretrained(model)
    scorer, _ = load_reward_model(reward_model)

    def reward(prompts: list[Any], completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        sequences = [
            (encode_prompt(tokenizer, prompt_messages(p)), ids) for p, ids in zip(prompts, completion_ids, strict=True)
        ]
        # Each sequence whole, as TRL scores with a reward model of its own (no prompt shared between completions).
        pad_id = int(tokenizer.pad_token_id)
        return score_sequences(scorer, sequences, pad_id=pad_id, batch_size=16, share_prompt=False).tolist()

    args = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=GRPO_PROMPTS * GRPO_K,
        num_generations=GRPO_K,
        num_iterations=GRPO_ITERATIONS,
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        top_p=1.0,
        beta=GRPO_BETA,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=RL_LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        num_train_epochs=1,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        seed=0,
    )
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": prompt_messages(p)} for p in prompts])
    trainer = GRPOTrainer(
        model=policy, reward_funcs=[reward], args=args, train_dataset=data, processing_class=tokenizer
    )
    if clock is not None:
        generate_and_score = trainer._generate_and_score_completions

        def counted(inputs: Any) -> Any:
            out = generate_and_score(inputs)
            completion = int(out["completion_mask"].sum())
            clock.rollout_tokens += completion
            clock.update_tokens += GRPO_ITERATIONS * (completion + int(out["prompt_mask"].sum()))
            return out

        trainer._generate_and_score_completions = clock.timed(counted)
    return trainer


def child_grpo(engine: str, model: str, reward_model: str, count: int) -> dict:
    prompts = demo_prompts(count)
    clock = Clock()
    if engine == "trl":
        with tempfile.TemporaryDirectory() as out:
            trainer = trl_grpo_trainer(model, reward_model, prompts, out, clock)
            clock.start()
            trainer.train()
            clock.stop()
        return clock.result()

    import training.grpo_online as grpo_online

    roll_out = grpo_online._roll_out

    def counted_roll_out(*args: Any, **kwargs: Any) -> Any:
        rollout = roll_out(*args, **kwargs)
        clock.rollout_tokens += sum(len(c) for _, c in rollout.sequences)
        clock.update_tokens += GRPO_ITERATIONS * rollout.tokens
        return rollout

    grpo_online._roll_out = clock.timed(counted_roll_out)
    clock.around_loop(grpo_online)
    with tempfile.TemporaryDirectory() as out:
        result = grpo_online.train_grpo_online(
            grpo_config(engine, reward_model),
            train_examples=[{"prompt": p} for p in prompts],
            eval_examples=[],
            model=model,
            out_dir=Path(out) / "policy",
        )
    return clock.result() | {"precision": result.metrics["precision"]}


def child_grpo_loss(model: str, reward_model: str) -> dict:
    """Our grpo_loss and TRL's _compute_loss on one rollout of ours, before and after one optimizer step."""
    import torch

    from training.data import encode_prompt, prompt_messages
    from training.generate import SamplingConfig
    from training.grpo_online import _roll_out
    from training.logprobs import grouped_logps
    from training.losses import grpo_loss
    from training.rollouts import frozen_reference, load_scorer
    from training.runs import load_policy, make_optimizer

    prompts = demo_prompts(GRPO_PROMPTS)
    results: dict[str, list[dict]] = {}
    for loss_type in ("grpo", "dapo"):
        config = grpo_config("matched", reward_model, loss_type=loss_type)
        setup = load_policy(config, model)
        policy, tokenizer = setup.model, setup.tokenizer
        scorer = load_scorer(reward_model, tokenizer, model, setup.device)
        sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=NEW_TOKENS, seed=0)
        rollout = _roll_out(policy, frozen_reference(policy), scorer, tokenizer, prompts, config, sampling, "fp32")
        assert len(rollout.sequences) == len(prompts) * GRPO_K  # every group's rewards differ
        mask = rollout.mask
        with tempfile.TemporaryDirectory() as out:
            trainer = trl_grpo_trainer(model, reward_model, prompts, out)
        trl_model = trainer.model  # TRL's own copy of the base (its forward patched for its fused log-probs)
        trl_model.train()
        trainer.loss_type, trainer.beta = loss_type, GRPO_BETA
        trainer.current_gradient_accumulation_steps = 1
        trainer.args.steps_per_generation = 1

        # TRL's batch layout: prompts left-padded, completions right-padded, each with its mask
        k = GRPO_K
        ids = [encode_prompt(tokenizer, prompt_messages(p)) for p in prompts]
        width = max(map(len, ids))
        prompt_ids = torch.tensor([[0] * (width - len(i)) + i for i in ids for _ in range(k)])
        prompt_mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids for _ in range(k)])
        completion_ids = torch.zeros_like(mask, dtype=torch.long)
        for row, (_, completion) in enumerate(rollout.sequences):
            completion_ids[row, : len(completion)] = torch.tensor(completion)
        inputs: dict[str, Any] = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": mask.long(),
            "advantages": rollout.advantages,
            "ref_per_token_logps": rollout.ref_logps,
            "num_items_in_batch": mask.sum(),
        }
        optimizer, params = make_optimizer(policy, lr=config.learning_rate, weight_decay=0.0)
        policy.train()
        steps = []
        old_logps = None
        for _ in range(2):
            logps = grouped_logps(
                policy,
                rollout.sequences,
                pad_id=setup.pad_id,
                share_prompt=config.share_prompt,
                chunk_size=config.logprob_chunk_size,
            ).float()
            old = logps.detach() if old_logps is None else old_logps
            ours = grpo_loss(
                logps, old, rollout.ref_logps, rollout.advantages, mask, beta=GRPO_BETA, loss_type=loss_type
            )
            trl_model.load_state_dict(policy.state_dict())  # the weights ours has now, in TRL's model
            with torch.no_grad():
                trl = trainer._compute_loss(
                    trl_model, inputs | ({} if old_logps is None else {"old_per_token_logps": old})
                )
            steps.append({"ours": float(ours), "trl": float(trl)})
            ours.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            old_logps = old
        results[loss_type] = steps
    return results


# ---------------------------------------------------------------------------- parent


def run_child(kind: str, engine: str, args: argparse.Namespace, work: Path, trl_path: str | None = None) -> dict:
    result_file = work / f"{kind}-{engine}.json"
    command = [sys.executable, __file__, "--child", kind, "--engine", engine, "--model", args.model]
    command += ["--result", str(result_file), "--work", str(work)]
    if kind != "reward":
        command += ["--reward-model", str(args.reward_model), "--prompts", str(args.prompts)]
    env = None
    if trl_path:
        env = os.environ | {"PYTHONPATH": os.pathsep.join([trl_path, str(ROOT)]), "TRL_EXPERIMENTAL_SILENCE": "1"}
    measured = run_measured(command, cwd=ROOT, env=env)
    return json.loads(result_file.read_text()) | vars(measured)


def report_rl(kind: str, results: dict[str, dict]) -> None:
    print(
        "| run | wall | CPU | peak RSS | train loop wall / CPU | rollouts: tokens, wall s, CPU s, tokens/s, "
        "tokens/CPU s | updates: tokens, wall s, CPU s, tokens/s, tokens/CPU s | load |"
    )
    print("|---|---:|---:|---:|---:|---|---|---|")
    for name, r in results.items():
        if name == "loss":
            continue
        print(
            f"| {name} | {r['wall_seconds']:.1f} s | {r['cpu_seconds']:.1f} s | {r['peak_rss_mb']:.0f} MB | "
            f"{r['train_seconds']:.1f} / {r['train_cpu_seconds']:.1f} s | {r['rollout_tokens']}, "
            f"{r['rollout_seconds']:.1f}, {r['rollout_cpu_seconds']:.1f}, {r['rollout_tokens_per_second']:.1f}, "
            f"{r['rollout_tokens_per_cpu_second']:.1f} | {r['update_tokens']}, {r['update_seconds']:.1f}, "
            f"{r['update_cpu_seconds']:.1f}, {r['update_tokens_per_second']:.1f}, "
            f"{r['update_tokens_per_cpu_second']:.1f} | {r['load_before']} -> {r['load_after']} |"
        )
    trl = results.get("trl")
    for name in ("ours-matched", "ours-default"):
        if trl and name in results:
            r = results[name]
            ratio = {
                key: r[key] / trl[key]
                for key in (
                    "rollout_tokens_per_second",
                    "rollout_tokens_per_cpu_second",
                    "update_tokens_per_second",
                    "update_tokens_per_cpu_second",
                )
            }
            print(
                f"\n{name} against TRL: rollouts {ratio['rollout_tokens_per_second']:.2f}x tokens/s "
                f"({ratio['rollout_tokens_per_cpu_second']:.2f}x per CPU second), updates "
                f"{ratio['update_tokens_per_second']:.2f}x tokens/s ({ratio['update_tokens_per_cpu_second']:.2f}x "
                "per CPU second)"
            )
    if "loss" in results:
        measured = ("wall_seconds", "cpu_seconds", "peak_rss_mb", "load_before", "load_after")
        print(f"\nlosses from the same rollouts ({kind}):")
        print(json.dumps({k: v for k, v in results["loss"].items() if k not in measured}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", nargs="?", choices=("reward", "ppo", "grpo"))
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="base model directory")
    parser.add_argument("--reward-model", type=Path, help="our reward model of that base (ppo, grpo)")
    parser.add_argument("--trl-ppo", help="directory holding TRL 1.12.0, the last with a PPO trainer (ppo)")
    parser.add_argument("--pairs", type=int, default=32, help="pairs the reward models train on (reward)")
    parser.add_argument("--prompts", type=int, default=16, help="training prompts, one pass (ppo, grpo)")
    parser.add_argument("--only", nargs="*", help="run only these: trl matched default loss")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        rm = str(args.reward_model)
        children = {
            ("reward", "loss"): lambda: child_reward_loss(args.model, args.work / "pairs.json"),
            ("ppo", "loss"): lambda: child_ppo_loss(args.model, rm, 4 * args.prompts),
            ("grpo", "loss"): lambda: child_grpo_loss(args.model, rm),
        }
        if (args.child, args.engine) in children:
            result = children[(args.child, args.engine)]()
        elif args.child == "reward":
            result = child_reward(args.engine, args.model, args.work / "pairs.json")
        elif args.child == "ppo":
            result = child_ppo(args.engine, args.model, rm, args.prompts)
        else:
            result = child_grpo(args.engine, args.model, rm, args.prompts)
        args.result.write_text(json.dumps(result))
        return

    if args.check is None:
        parser.error("say which check: reward, ppo or grpo")
    if args.check != "reward" and args.reward_model is None:
        parser.error("--reward-model is required for ppo and grpo")
    if args.check == "ppo" and not args.trl_ppo:
        parser.error("--trl-ppo DIR is required: pip install --no-deps --target DIR trl==1.12.0")
    import training  # noqa: F401  (the OpenMP wait policy it sets is inherited by the children)

    work = Path(tempfile.mkdtemp(prefix=f"{args.check}-vs-trl-"))
    (work / "pairs.json").write_text(json.dumps(make_pairs(args.pairs, seed=0)))
    trl_path = args.trl_ppo if args.check == "ppo" else None
    results: dict[str, dict] = {}
    for engine in ("trl", "matched", "default", "loss"):
        if args.only and engine not in args.only:
            continue
        name = engine if engine in ("trl", "loss") else f"ours-{engine}"
        print(f"running {args.check}: {name} ...", flush=True)
        needs_trl = engine in ("trl", "loss")
        results[name] = run_child(args.check, engine, args, work, trl_path if needs_trl else None)
    print()
    if args.check == "reward":
        report_reward(results)
    else:
        report_rl(args.check, results)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nraw results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
