"""TRL's side of `vs_trl.py`: one `GRPOTrainer` run, timed step by step. Runs inside TRL's own venv.

`vs_trl.py` starts this script with the TRL virtual environment's python (it never imports our
package's heavy parts: only `rlhf_cluster/data/tasks.py` is loaded by file, for the very same
arithmetic verifier our reward workers use). Everything the run needs comes on the command line:

    python benchmarks/_trl_side.py --model DIR --prompts FILE.jsonl --tasks-file rlhf_cluster/data/tasks.py \
        --n 4 --prompts-per-step 32 --max-new-tokens 16 --steps 20 --lr 1e-3 --beta 0.01 --out result.json

Per-step seconds come from a `TrainerCallback`: the time between consecutive `on_step_end` calls
(step 0 is timed from `on_train_begin`; the caller treats the first steps as warmup), and the
share of it spent in TRL's `_generate_and_score_completions` (generation, reward, reference
log-probs) is recorded too. Rewards and
completion lengths are TRL's own per-step logs (`logging_steps=1`). The result is written as
JSON to `--out` and printed as the last stdout line, prefixed with `TRL_RESULT `.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model folder (the same one our side loads)")
    p.add_argument("--prompts", required=True, help="JSONL file with prompt_id, prompt, answer (in training order)")
    p.add_argument(
        "--tasks-file", required=True, help="path of rlhf_cluster/data/tasks.py (the verifier and combine_reward)"
    )
    p.add_argument("--task", default="arithmetic", help="its verifier is tasks.verify_<task>")
    p.add_argument(
        "--reward-weights",
        required=True,
        help="JSON {component: weight}: rlhf_cluster.data.verifiers.REWARD_WEIGHTS[task], from our side",
    )
    p.add_argument("--n", type=int, required=True, help="num_generations (group size)")
    p.add_argument("--prompts-per-step", type=int, required=True)
    p.add_argument("--max-new-tokens", type=int, required=True, help="max_completion_length")
    p.add_argument("--steps", type=int, required=True, help="max_steps")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--beta", type=float, required=True, help="KL coefficient (k3 in the loss, like ours)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--clip", type=float, default=0.2, help="epsilon (PPO clip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default, one per core)")
    p.add_argument("--out", required=True, help="JSON result file")
    return p.parse_args(argv)


def load_tasks(path: str):
    """rlhf_cluster/data/tasks.py loaded by file (not as a package): the same verifier and weights."""
    spec = importlib.util.spec_from_file_location("rlhf_tasks", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--tasks-file {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    os.environ.setdefault("WANDB_DISABLED", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from datasets import Dataset
    from trl import GRPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = load_tasks(args.tasks_file)
    verify = getattr(tasks, f"verify_{args.task}")
    weights = json.loads(args.reward_weights)

    def task_reward(completions, answer, **_):
        # The same reward our RewardWorker computes: combine_reward(verify(response, answer), weights).
        return [tasks.combine_reward(verify(c, a), weights) for c, a in zip(completions, answer)]

    with open(args.prompts) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    out_dir = tempfile.mkdtemp(prefix="trl-grpo-")
    config = grpo_config(args, out_dir)
    timer = step_timer()
    trainer = GRPOTrainer(
        model=args.model, reward_funcs=task_reward, args=config, train_dataset=dataset, callbacks=[timer]
    )
    # Generation + scoring (+ reference log-probs) of each step's batch, timed inside TRL's own step.
    generate_seconds: list[float] = []
    inner = trainer._generate_and_score_completions

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            generate_seconds.append(time.perf_counter() - t0)

    trainer._generate_and_score_completions = timed_generate
    setup_s = time.perf_counter() - t_start
    t_train = time.perf_counter()
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # save_strategy="no": nothing of ours is in it
    train_s = time.perf_counter() - t_train
    result = {
        "side": "trl",
        "setup_seconds": setup_s,
        "train_seconds": train_s,
        "step_seconds": timer.step_seconds,
        "generate_seconds": generate_seconds,
        "samples_per_step": args.prompts_per_step * args.n,
        "rewards": [log["reward"] for log in timer.logs],
        "completion_len_mean": [log.get("completions/mean_length") for log in timer.logs],
        "logs": timer.logs,
        "model_parameters": sum(p.numel() for p in trainer.model.parameters()),
        "config": {k: getattr(config, k) for k in CONFIG_KEYS},
        "versions": versions(),
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print("TRL_RESULT " + json.dumps({k: result[k] for k in ("setup_seconds", "step_seconds", "rewards")}), flush=True)
    return 0


CONFIG_KEYS = (
    "per_device_train_batch_size",
    "num_generations",
    "max_completion_length",
    "max_steps",
    "temperature",
    "top_p",
    "top_k",
    "beta",
    "epsilon",
    "loss_type",
    "scale_rewards",
    "learning_rate",
    "lr_scheduler_type",
    "max_grad_norm",
    "gradient_checkpointing",
    "bf16",
    "num_iterations",
    "steps_per_generation",
    "use_vllm",
)  # the settings of TRL's run recorded in the result


def grpo_config(args: argparse.Namespace, out_dir: str):
    """TRL's settings for the same GRPO work as ours (vs_trl.py's docstring lists what is identical)."""
    import torch
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out_dir,
        # batch: prompts_per_step prompts x n completions, one optimizer step per generation batch
        per_device_train_batch_size=args.prompts_per_step * args.n,
        gradient_accumulation_steps=1,
        num_generations=args.n,
        num_iterations=1,
        max_completion_length=args.max_new_tokens,
        max_steps=args.steps,
        # sampling
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=0,
        use_vllm=False,
        # objective: k3 KL in the loss with coefficient beta, PPO clip, token mean over the whole batch
        beta=args.beta,
        epsilon=args.clip,
        loss_type="dapo",
        scale_rewards="group",
        # optimizer: AdamW, constant LR, no weight decay, grad-norm clip (our learner's defaults)
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=args.max_grad_norm,
        # numerics and plumbing: fp32 like ours, no activation checkpointing (ours has none)
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": torch.float32},
        shuffle_dataset=False,
        seed=args.seed,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


def step_timer():
    """A `TrainerCallback` that keeps each step's seconds (between consecutive `on_step_end` calls;
    the first from `on_train_begin`) and TRL's logged rows with a reward."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.last = time.perf_counter()  # reset by on_train_begin
            self.step_seconds: list[float] = []
            self.logs: list[dict] = []

        def on_train_begin(self, a, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            self.step_seconds.append(now - self.last)
            self.last = now

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
                self.logs.append({"step": state.global_step, **numbers})

    return StepTimer()


def versions() -> dict:
    import accelerate
    import datasets
    import torch
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
