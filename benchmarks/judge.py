"""Judge rewards on the demo task: does a job rewarded by a judge model alone learn, and does it
not when the judge is a placebo?

1. The judge: a tiny Qwen2 (the demo's tokenizer; `--judge-hidden`, 4 layers) trained here by
   supervised fine-tuning to reply `yes` or `no` to the template `TEMPLATE` ("{prompt}{response}
   |{answer}|"), on synthetic responses to the task's training sums (the right sum, wrong numbers,
   token junk, the sum with junk after it), labelled by the demo's verifier (`correct`). Its
   accuracy on fresh examples is printed and recorded.
2. The placebo: the same training with the labels shuffled (it answers yes/no unrelated to the
   response).
3. Per `--seeds`: `configs/demo.yaml` (its supervised warm-up, then `--steps` GRPO steps) with
   `scoring.rewards: [verifier at weight 0 (recorded, not rewarded), the judge at weight 1]`.

Figures: the sampled held-out accuracy (30 sums never trained on x 32 answers, judged by the
verifier) before -> after, and how often the judge's verdict agreed with the verifier's `correct`
over the last fifth of the run's scored samples.

    .venv/bin/python -m benchmarks.judge [--seeds 0 1 2 --steps 240]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from functools import partial
from pathlib import Path

from benchmarks import _learning as learning
from benchmarks._jobs import local_ray, run_job_quietly
from benchmarks.common import REPO, headline, run_script

TEMPLATE = "{prompt}{response}|{answer}|"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = learning.jobs_parser(
        __doc__, "judge", steps=240, sides=("judge", "placebo"), steps_help="GRPO steps of every job"
    )
    p.add_argument("--judge-steps", type=int, default=1500, help="supervised steps of each judge")
    p.add_argument(
        "--judges-dir",
        type=Path,
        default=None,
        help="keep the trained judges here, and reuse those already there (default: the run's temp dir)",
    )
    p.add_argument("--judge-hidden", type=int, default=128)
    return p.parse_args(argv)


def demo_config(args: argparse.Namespace, name: str, seed: int, run_dir: Path, judge: str | None):
    from rlhf_cluster.config import load_config

    sets = [
        *learning.job_overrides(run_dir, args.cache_dir, seed, f"bench-judge-{name}-s{seed}", args.steps),
        "train.record_rollouts=true",
    ]
    cfg = load_config(REPO / "configs" / "demo.yaml", sets)
    if judge is None:
        return cfg
    raw = cfg.model_dump()
    raw["scoring"]["rewards"] = [
        {"type": "verifier", "weight": 0.0},
        {"type": "judge", "model": judge, "template": TEMPLATE, "verdict": "yes_no", "max_tokens": 3},
    ]
    return type(cfg).model_validate(raw)


# ---- the judge, trained here -----------------------------------------------------------------
def examples(n: int, seed: int, max_operand: int, tokenizer) -> list[tuple[str, str, str, bool]]:
    """(prompt, response, answer, the verifier's `correct`) over the task's training sums."""
    from rlhf_cluster.data.tasks import arithmetic_rows, verify_arithmetic

    rng = random.Random(seed)
    rows = arithmetic_rows(n, seed, "train", max_operand)
    vocab = list(range(len(tokenizer)))
    out = []
    for row in rows:
        answer = row["answer"]
        kind = rng.random()
        if kind < 0.45:
            response = answer
        elif kind < 0.60:
            response = str(int(answer) + rng.choice([-1, 1, -10, 10]))
        elif kind < 0.80:
            response = str(rng.randint(0, 2 * max_operand))
        elif kind < 0.90:
            response = tokenizer.decode(rng.sample(vocab, rng.randint(1, 4)), skip_special_tokens=True)
        else:
            response = answer + tokenizer.decode(rng.sample(vocab, 1), skip_special_tokens=True)
        out.append((row["prompt"], response, answer, verify_arithmetic(response, answer)["correct"] >= 0.5))
    return out


def train_judge(args: argparse.Namespace, tokenizer_dir: Path, out: Path, placebo: bool, seed: int = 0) -> dict:
    """A judge folder at `out` trained to reply yes/no (shuffled labels for the placebo); its
    accuracy against the verifier on fresh examples."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from rlhf_cluster.scoring.judge import render

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token_id
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=args.judge_hidden,
            intermediate_size=2 * args.judge_hidden,
            num_hidden_layers=4,
            num_attention_heads=args.judge_hidden // 64,
            num_key_value_heads=1,
            max_position_embeddings=128,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=eos,
            tie_word_embeddings=False,
        )
    )
    train = examples(20000, seed + 1, 9, tokenizer)
    labels = [c for *_, c in train]
    if placebo:
        random.Random(seed + 2).shuffle(labels)
    replies = {True: tokenizer("yes")["input_ids"] + [eos], False: tokenizer("no")["input_ids"] + [eos]}
    rows = []
    for (prompt, response, answer, _), label in zip(train, labels):
        ids = tokenizer(render(TEMPLATE, prompt, answer, response))["input_ids"]
        rows.append((ids, replies[label]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    pad = tokenizer.pad_token_id
    started = time.perf_counter()
    model.train()
    for step in range(args.judge_steps):
        batch = random.Random(step).sample(rows, 128)
        width = max(len(a) + len(b) for a, b in batch)
        ids = torch.full((len(batch), width), pad)
        target = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (a, b) in enumerate(batch):
            ids[i, : len(a) + len(b)] = torch.tensor(a + b)
            target[i, len(a) : len(a) + len(b)] = torch.tensor(b)
            mask[i, : len(a) + len(b)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if args.verbose and step % 500 == 0:
            print(f"    judge step {step}: loss {loss.item():.4f}", flush=True)
    model.eval()
    fresh = examples(400, seed + 99, 9, tokenizer)
    agree = 0
    with torch.no_grad():
        for prompt, response, answer, correct in fresh:
            ids = torch.tensor([tokenizer(render(TEMPLATE, prompt, answer, response))["input_ids"]])
            # transformers types `generate`'s self as GenerativePreTrainedModel, which the model is at run time.
            generated = model.generate(ids, max_new_tokens=3, do_sample=False)  # type: ignore[misc]
            reply = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
            agree += str(reply).strip().startswith("yes") == correct
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        "accuracy_vs_verifier": agree / len(fresh),
        "train_seconds": time.perf_counter() - started,
        "final_loss": loss.item(),
    }


# ---- the jobs ----------------------------------------------------------------------------------
def agreement(cfg, last_fraction: float = 0.2) -> tuple[float | None, float]:
    """How often the judge's verdict agreed with the verifier's `correct` over the run's last
    scored samples, and the share of samples the judge judged among them."""
    from rlhf_cluster.run.run_dir import RunDir
    from rlhf_cluster.run.scored_log import ScoredLog

    samples = [s for _, group in ScoredLog(Path(cfg.run_dir) / RunDir.SCORED_LOG).since(0) for s in group]
    tail = samples[int(len(samples) * (1 - last_fraction)) :]
    pairs = [
        (s.reward_components["judge/judge"], s.reward_components["correct"])
        for s in tail
        if "judge/judge" in s.reward_components
    ]
    agreed = sum((j >= 0.5) == (c >= 0.5) for j, c in pairs) / len(pairs) if pairs else None
    return agreed, len(pairs) / max(len(tail), 1)


def main(argv: list[str] | None = None) -> int:
    from rlhf_cluster.config import load_config
    from rlhf_cluster.models.tiny_model import ensure_tiny_model

    args = parse_args(argv)
    args.cache_dir = str(Path(args.cache_dir).expanduser())
    t0 = time.perf_counter()
    with local_ray(args.verbose, "bench-judge-") as runs:
        demo = load_config(REPO / "configs" / "demo.yaml", [f"model.cache_dir={args.cache_dir}"])
        tokenizer_dir = ensure_tiny_model(demo.model.tiny, args.cache_dir)
        judges, trained = {}, {}
        for side in args.sides:
            judges[side] = (args.judges_dir or runs) / f"{side}-model"
            measured = judges[side] / "judge_training.json"
            if measured.is_file():
                trained[side] = json.loads(measured.read_text())
            else:
                trained[side] = train_judge(args, tokenizer_dir, judges[side], placebo=side == "placebo")
                measured.write_text(json.dumps(trained[side]))
            print(
                f"  {side} judge: agrees with the verifier on {trained[side]['accuracy_vs_verifier']:.1%} of fresh "
                f"examples ({trained[side]['train_seconds']:.0f}s of training)",
                flush=True,
            )

        def job(side: str, seed: int) -> dict:
            cfg = demo_config(args, side, seed, runs / f"{side}-s{seed}", str(judges[side]))
            result = run_job_quietly(cfg, args.verbose)
            agreed, judged = agreement(cfg)
            return {
                "side": side,
                "seed": seed,
                **learning.held_out(result),
                "agreement_last_fifth": agreed,
                "judged_share_last_fifth": judged,
            }

        jobs = learning.run_per_seed(args, job, show, partial(report, args, trained), t0)
    report(args, trained, jobs, time.perf_counter() - t0, final=True)
    return 0


def show(job: dict) -> str:
    agreed = job["agreement_last_fifth"]
    return (
        f"  {job['side']} judge, seed {job['seed']}: {learning.held_out_text(job)}, "
        f"agreement with the verifier at the end {agreed if agreed is None else f'{agreed:.1%}'}, {job['seconds']:.0f}s"
    )


def report(args: argparse.Namespace, trained: dict, jobs: list[dict], seconds: float, final: bool) -> None:
    gains = learning.gains_by_side(jobs, args.sides)
    agree = [j["agreement_last_fifth"] or 0.0 for j in jobs if j["side"] == "judge"]
    learns = learning.beats_control(gains, "judge", "placebo") and min(agree) >= 0.8
    top = headline("every judge seed gains beyond the placebo's best, >= 80% agreement", float(learns), "= 1", learns)
    learning.write_jobs(args, "judge", final, seconds, jobs, gains, top, template=TEMPLATE, judges=trained)
    if final:
        print(
            f"\njudge  configs/demo.yaml, {args.steps} steps, rewarded by the judge alone: sampled held-out "
            f"accuracy | {seconds:.0f}s"
        )
        agreed = {
            "agreement (last fifth)": lambda j: (
                "-" if j["agreement_last_fifth"] is None else f"{j['agreement_last_fifth']:.1%}"
            )
        }
        learning.print_jobs(jobs, "judge", more=agreed)


if __name__ == "__main__":
    run_script(main)
