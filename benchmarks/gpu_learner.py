"""The learner at real model shapes: our FSDP2 step against a plain PyTorch loop on the same tokens,
and the memory of the log-prob path at a real vocabulary.

Learner step (`--shape`): random weights built from a published shape (vocabulary 151,936, tied
embeddings where the real model ties them) and RL-shaped batches (on CUDA 16 sequences, 256-token
prompts, responses of 64..768 tokens drawn with a fixed seed; a third of a padded batch is
padding). One side at a time (built, timed, freed before the next is built: no two share the
GPU's memory), `--reps` timed steps each after `--warmup`, medians:
- `ours`: `FSDP2Learner.train_step` as configured by default (sequence packing, chunked log-probs,
  one host read per update; on CUDA bf16 mixed precision and the memory plan's checkpointing and
  micro-batch tokens, `rlhf_cluster/learner/memory_plan.py`, whose estimate is printed beside the
  measured peak);
- `ours+ckpt` (`--checkpointing`): the same with gradient checkpointing forced on;
- `ours, deepspeed` (`--deepspeed`): the same step on the DeepSpeed ZeRO-3 backend;
- `ours, compiled` (`--compile`): ours with `learner.compile` (each decoder layer's forward through
  inductor; its compilation falls in the warm-up steps);
- `ours, flex_attention` (`--attention flex_attention`, any `learner.attention`): ours with that
  attention instead of the default (`auto`: SDPA here, where max_new_tokens is 1024); FlexAttention runs
  one packed row per micro-batch under a document mask;
- `plain`: the loop a user would write: fp32 master weights, bf16 autocast on CUDA, fused AdamW on
  CUDA, the model's full logits and a log-softmax over them, the padded batch.
`--seq-lens 1024 4096 16384` times ours (and `--seq-len-sides`) again on sequences of about those
lengths, `--tokens-per-step` tokens per step (MFU should not fall with length).
Figures: seconds per step, real-token MFU (6 x parameters x real tokens / step time / the GPU's
dense bf16 peak), peak GPU memory, and ours / plain. On the CPU also the aten operations of one of
ours' steps, and those per decoder layer per micro-batch in its forward (what a GPU launches). Without CUDA the same code runs at the `tiny`
shape (still vocabulary 151,936) as a smoke run: seconds only, and the before/after ratio of the
CPU learner (`ours` vs `ours` with the padded full-logits path of before issue 35).

Log-prob path memory (CPU, `--logprob-tokens`): forward and backward of the response tokens'
log-probs and entropies from final hidden states (hidden 896, vocabulary 151,936), the chunked
path (`rlhf_cluster.models.chunked_logprobs`) against the full-logits path it replaced, each in its own
process, peak resident memory above the inputs. The full path runs under a data limit
(`--full-limit-gib`): where it does not fit, its figure is "more than the limit".

    .venv/bin/python benchmarks/gpu_learner.py                       # CPU: tiny shape + log-prob memory at 8k tokens
    .venv/bin/python benchmarks/gpu_learner.py --shape demo --batch 128 --prompt 8 --response 1 4 --logprob-tokens
                                                                     # CPU: the demo's learner step, before vs after
    python3 benchmarks/gpu_learner.py --shape qwen2.5-1.5b [--checkpointing] [--deepspeed] [--seq-lens 4096 16384]
                                                                     # on a GPU (make gpu-check runs the set)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from _common import free_port, headline, machine_info, print_table, random_model, result_path, write_result

# Dense bf16 peak FLOP/s by device name (vendor datasheets; sparse figures halved).
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
VOCAB = 151936
# Published shapes (Qwen2.5 model cards' config.json); `tiny` is the CPU smoke shape.
SHAPES = {
    # The CPU demo's model (configs/demo.yaml: hidden 64, 2 layers), its own small vocabulary.
    "demo": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128,
                 tie_word_embeddings=None),  # as the tiny model builder ties it
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                 intermediate_size=1024, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, tie_word_embeddings=True),
    "qwen2.5-3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       intermediate_size=11008, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, tie_word_embeddings=False),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b" if cuda else "tiny")
    p.add_argument("--batch", type=int, default=16 if cuda else 4, help="sequences per step")
    p.add_argument("--prompt", type=int, default=256 if cuda else 32, help="prompt tokens per sequence")
    p.add_argument("--response", type=int, nargs=2, default=[64, 768] if cuda else [8, 96],
                   help="response lengths drawn uniformly from this range (seeded)")
    p.add_argument("--checkpointing", action="store_true", help="also time ours with gradient checkpointing")
    p.add_argument("--padded", action="store_true", help="also time ours with sequence packing off (right-padded rows)")
    p.add_argument("--deepspeed", action="store_true", help="also time ours on the DeepSpeed ZeRO-3 backend")
    p.add_argument("--compile", action="store_true", help="also time ours with learner.compile (regional torch.compile)")
    p.add_argument("--attention", nargs="*", default=[], choices=["sdpa", "flex_attention", "flash_attention_2", "eager"],
                   help="also time ours with these learner.attention settings (the default is auto)")
    p.add_argument("--no-plain", dest="plain", action="store_false", help="leave the plain loop out")
    p.add_argument("--seq-lens", type=int, nargs="*", default=[],
                   help="also time ours (and --seq-len-sides) on sequences of about these many tokens each, "
                        "--tokens-per-step tokens per step (e.g. 1024 4096 16384)")
    p.add_argument("--seq-len-sides", nargs="*", default=["ours"], help="the sides timed at --seq-lens")
    p.add_argument("--tokens-per-step", type=int, default=16384, help="tokens per step at --seq-lens")
    p.add_argument("--reps", type=int, default=5 if cuda else 3)
    p.add_argument("--warmup", type=int, default=2 if cuda else 1)
    p.add_argument("--logprob-tokens", type=int, nargs="*", default=[] if cuda else [8192],
                   help="CPU log-prob path memory at these response-token counts (none: skip)")
    p.add_argument("--full-limit-gib", type=float, default=16.0, help="data limit of the full-logits path's process")
    p.add_argument("--cache-dir", default="~/.cache/rlhf_cluster/models")
    p.add_argument("--out", type=Path, default=result_path("gpu_learner"))
    p.add_argument("--logprob-worker", nargs=2, metavar=("PATH", "TOKENS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- models and batches -------------------------------------------------------------------------
def build_model(shape: str, cache_dir: str) -> Path:
    """A random-weight Qwen2 of a published shape, saved once as an HF folder with the tiny tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if shape == "demo":
        from rlhf_cluster.config import TinyModelConfig
        from rlhf_cluster.models.tiny_model import ensure_tiny_model

        d = SHAPES["demo"]
        return Path(ensure_tiny_model(TinyModelConfig(hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
                                                      num_heads=d["num_attention_heads"], num_kv_heads=d["num_key_value_heads"]),
                                      cache_dir))
    folder = Path(cache_dir).expanduser() / f"random-{shape}-v{VOCAB}"
    if (folder / "config.json").is_file():
        return folder
    _, tiny = random_model(64, 1, 128, cache_dir)  # its tokenizer files
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, max_position_embeddings=32768, **SHAPES[shape])
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    Qwen2ForCausalLM(config).save_pretrained(scratch)
    for f in Path(tiny).iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, scratch / f.name)
    scratch.rename(folder)
    return folder


def make_batch(args: argparse.Namespace, vocab: int):
    """The step's batch: `--batch` sequences of a `--prompt`-token prompt and a `--response` range."""
    return batch_of(args.batch, args.prompt, args.response, vocab)


def long_batch(seq_len: int, tokens_per_step: int, vocab: int):
    """Sequences of about `seq_len` tokens (a quarter prompt, responses 80-100% of the rest),
    `tokens_per_step` // `seq_len` of them (at least one)."""
    prompt = seq_len // 4
    rest = seq_len - prompt
    return batch_of(max(1, tokens_per_step // seq_len), prompt, (rest * 4 // 5, rest), vocab)


def batch_of(n: int, prompt: int, response: tuple[int, int] | list[int], vocab: int):
    from rlhf_cluster.experience.records import ScoredSample, TrainBatch

    rng = random.Random(0)
    samples = []
    for i in range(n):
        r = rng.randint(*response)
        samples.append(ScoredSample(
            sample_id=f"s{i}", prompt_id=f"p{i}", group_id=f"g{i // 4}",
            prompt_ids=[rng.randrange(2, vocab) for _ in range(prompt)],
            response_ids=[rng.randrange(2, vocab) for _ in range(r)], rollout_logprobs=[-6.0] * r, policy_version=0,
            finish_reason="stop", reward=0.0, reward_components={}, ref_logprobs=[-6.0] * r,
            advantages=[rng.uniform(-1, 1)] * r))
    return TrainBatch.from_samples(samples)


# ---- the sides ------------------------------------------------------------------------------------
class Ours:
    """The learner's train_step as configured by default (FSDP2; `backend="deepspeed"`: ZeRO-3;
    `before`: the padded full-logits path)."""

    def __init__(self, model_dir: Path, precision: str, checkpointing: bool | None = None, before: bool = False,
                 packing: bool = True, backend: str = "fsdp2", attention: str = "auto", compile: bool = False):
        from rlhf_cluster.config import JobConfig
        from rlhf_cluster.learner.base import LearnerSpec

        learner = {"lr": 1e-5, "mixed_precision": precision, "sequence_packing": False if before else packing,
                   "backend": backend, "attention": attention, "compile": compile}
        if checkpointing is not None:  # None: the learner's default
            learner["gradient_checkpointing"] = checkpointing
        cfg = JobConfig.model_validate({
            "learner": learner,
            "generation": {"sampling": {"max_new_tokens": 1024}},
            "algorithm": {"kl": {"placement": "loss", "coef": 0.01}},
            "metrics": {"enabled": False},
        })
        if backend == "deepspeed":
            from rlhf_cluster.learner.deepspeed import DeepSpeedLearner as Learner
        else:
            from rlhf_cluster.learner.fsdp2 import FSDP2Learner as Learner
        self.learner = Learner(LearnerSpec.of_policy(cfg), str(model_dir))
        self.before = before

    def step(self, batch) -> None:
        if not self.before:
            self.learner.train_step(batch, kl_coef=0.01)
            return
        import rlhf_cluster.learner.base as base

        chunked = base.response_logprobs
        base.response_logprobs = lambda *a, chunk_tokens=None, **k: chunked(*a, chunk_tokens=None, **k)
        try:
            self.learner.train_step(batch, kl_coef=0.01)
        finally:
            base.response_logprobs = chunked

    def parameters(self) -> int:
        return sum(p.numel() for p in self.learner.model.parameters())


class Plain:
    """The plain loop: fp32 master weights, bf16 autocast (CUDA), fused AdamW (CUDA), full logits."""

    def __init__(self, model_dir: Path, precision: str):
        from rlhf_cluster.models.modeling import load_causal_lm

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_causal_lm(model_dir, torch.float32, self.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=self.device.type == "cuda")
        self.autocast = precision == "bf16"

    def step(self, batch) -> None:
        from rlhf_cluster.models.modeling import response_logprobs

        b = {k: v.to(self.device) for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            logp, _ = response_logprobs(self.model, b["input_ids"], b["attention_mask"], b["prompt_lengths"],
                                        b["response_mask"].shape[1], chunk_tokens=None)
        mask = b["response_mask"]
        loss = -(logp * b["advantages"] * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_side(args: argparse.Namespace, name: str, build, batches: dict[str, object]) -> dict[str, dict]:
    """Build one side, time it on each of `batches` (`--warmup` untimed steps, then `--reps`), free
    it (and the GPU's cache) before the next side is built: sides never share the GPU's memory.
    Per batch: the step times and the peak memory, or the error (out of memory) that stopped it."""
    cuda = torch.cuda.is_available()
    out: dict[str, dict] = {}
    try:
        side = build()
    except torch.OutOfMemoryError as e:
        return {key: {"error": f"out of memory building it: {str(e)[:120]}"} for key in batches}
    try:
        for key, batch in batches.items():
            times: list[float] = []
            peak = 0
            try:
                for rep in range(-args.warmup, args.reps):
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    start = time.perf_counter()
                    side.step(batch)
                    if cuda:
                        torch.cuda.synchronize()
                        peak = max(peak, torch.cuda.max_memory_allocated())
                    seconds = time.perf_counter() - start
                    if rep >= 0:
                        times.append(seconds)
                    print(f"  {name} [{key}] rep {rep}: {seconds:.3f}s", flush=True)
                plan = getattr(getattr(side, "learner", None), "memory_plan", None)
                out[key] = {"timings": times, "peak_bytes": peak if cuda else None,
                            "plan": None if plan is None else {"checkpointing": plan.checkpointing,
                                                               "micro_batch_tokens": plan.micro_batch_tokens}}
            except torch.OutOfMemoryError as e:
                print(f"  {name} [{key}]: out of memory", flush=True)
                out[key] = {"error": f"out of memory: {str(e)[:120]}"}
                if cuda:
                    torch.cuda.empty_cache()
    finally:
        del side
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out


def op_counts(side: Ours, batch) -> dict[str, float]:
    """aten operations of one step of `side` (on the CPU: what a GPU would launch, before any
    fusion), and those inside the decoder layers' forward, per layer call (a layer per micro-batch)."""
    from rlhf_cluster.telemetry.op_counts import count_ops

    inner = getattr(side.learner.model, "module", side.learner.model)
    with count_ops(inner.model.layers) as counts:
        side.step(batch)
    return {"aten_ops_per_step": counts.total, "copies_per_step": counts.copies,
            "forward_aten_ops_per_decoder_layer_per_micro_batch": counts.per_layer_call,
            "decoder_layer_forward_calls": counts.layer_calls}


def join_one_rank_group() -> None:
    """torch.distributed at world size 1 on this machine's device: NCCL on CUDA, gloo on the CPU."""
    cuda = torch.cuda.is_available()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)


def device_and_peak() -> tuple[str, float | None]:
    """The device's name and its dense bf16 peak FLOP/s (None on the CPU or an unknown GPU)."""
    if not torch.cuda.is_available():
        return "cpu", None
    device = torch.cuda.get_device_name(0)
    return device, next((f for name, f in BF16_PEAK.items() if name in device), None)


def parameter_count(config) -> int:
    """Parameters of the model `config` describes (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# ---- log-prob path memory -----------------------------------------------------------------------
def logprob_worker(path: str, tokens: int) -> None:
    """In this process: one forward and backward of `path` (chunked / full); prints the peak resident
    memory above the inputs (sampled every 0.5 ms from /proc/self/statm), in bytes, as JSON."""
    from rlhf_cluster.models.chunked_logprobs import token_logprobs

    torch.manual_seed(0)
    # Made in place: a temporary here would raise the peak the baseline is read from.
    hidden = torch.randn(tokens, 896).requires_grad_()
    weight = torch.randn(VOCAB, 896).mul_(0.02).requires_grad_()
    targets = torch.randint(0, VOCAB, (tokens,))
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:  # resident bytes now (ru_maxrss is a peak since start: inputs' temporaries included)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if path == "chunked":
        logp, entropy = token_logprobs(hidden, weight, targets, with_entropy=True)
    else:
        log_p = (hidden @ weight.T).float().log_softmax(-1)
        logp = log_p.gather(1, targets[:, None]).squeeze(1)
        entropy = -(log_p.exp() * log_p).sum(-1)
    (logp.sum() + entropy.sum()).backward()
    done.set()
    sampler.join()
    print(json.dumps({"path": path, "tokens": tokens, "peak_bytes": max(peak[0], rss()) - base}))


def logprob_memory(args: argparse.Namespace) -> list[dict]:
    rows = []
    for tokens in args.logprob_tokens:
        for path in ("chunked", "full"):
            limit = int(args.full_limit_gib * 2**30) if path == "full" else None

            def cap(limit=limit):
                if limit:
                    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

            proc = subprocess.run([sys.executable, __file__, "--logprob-worker", path, str(tokens)], capture_output=True,
                                  text=True, preexec_fn=cap, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
            if proc.returncode == 0:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["fits"] = True
            else:  # out of memory under the limit: more than the limit
                row = {"path": path, "tokens": tokens, "peak_bytes": limit, "fits": False,
                       "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
            rows.append(row)
            shown = f"{row['peak_bytes'] / 2**30:.2f} GiB" if row["fits"] else f"> {args.full_limit_gib:.0f} GiB (did not fit)"
            print(f"  log-prob path {path}, {tokens} tokens: {shown}", flush=True)
    return rows


# ---- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.logprob_worker:
        logprob_worker(args.logprob_worker[0], int(args.logprob_worker[1]))
        return 0
    cuda = torch.cuda.is_available()
    precision = "bf16" if cuda else "none"
    join_one_rank_group()
    model_dir = build_model(args.shape, args.cache_dir)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    vocab = config.vocab_size
    params = parameter_count(config)
    from rlhf_cluster.learner.memory_plan import ModelShape, estimate

    shape = ModelShape.of_folder(model_dir)
    batches = {"default": make_batch(args, vocab)}
    for seq_len in args.seq_lens:
        batches[f"{seq_len}/seq"] = long_batch(seq_len, args.tokens_per_step, vocab)
    at_length = {key: b for key, b in batches.items() if key != "default"}
    default = {"default": batches["default"]}

    def for_side(name: str) -> dict:
        return {**default, **(at_length if name in args.seq_len_sides else {})}

    sides: dict[str, tuple] = {"ours": (lambda: Ours(model_dir, precision), for_side("ours"))}
    if args.padded:
        sides["ours, padded"] = (lambda: Ours(model_dir, precision, packing=False), default)
    if args.checkpointing:
        sides["ours+ckpt"] = (lambda: Ours(model_dir, precision, checkpointing=True), for_side("ours+ckpt"))
    for attention in args.attention:
        sides[f"ours, {attention}"] = (lambda a=attention: Ours(model_dir, precision, attention=a), for_side(f"ours, {attention}"))
    if args.compile:
        sides["ours, compiled"] = (lambda: Ours(model_dir, precision, compile=True), for_side("ours, compiled"))
    if args.deepspeed:
        sides["ours, deepspeed"] = (lambda: Ours(model_dir, precision, backend="deepspeed"), for_side("ours, deepspeed"))
    if not cuda:
        sides["ours, before issue 35"] = (lambda: Ours(model_dir, precision, before=True), default)
    if args.plain:
        sides["plain"] = (lambda: Plain(model_dir, precision), for_side("plain"))
    results = {name: time_side(args, name, build, side_batches) for name, (build, side_batches) in sides.items()}
    ops = op_counts(Ours(model_dir, precision), batches["default"]) if not cuda else None
    dist.destroy_process_group()

    device, peak_flops = device_and_peak()
    figures: dict[str, dict] = {}
    for name, per_batch in results.items():
        for key, got in per_batch.items():
            b = batches[key]
            real = int(b.attention_mask.sum())
            row: dict = {"side": name, "batch": key, "sequences": len(b.input_ids), "real_tokens": real,
                         "padded_tokens": b.attention_mask.numel()}
            if "error" in got:
                row["error"] = got["error"]
            else:
                sec = statistics.median(got["timings"])
                row.update(timings=got["timings"], seconds_per_step=sec, real_tokens_per_s=real / sec,
                           mfu=6 * params * real / sec / peak_flops if peak_flops else None,
                           peak_memory_gib=got["peak_bytes"] / 2**30 if got["peak_bytes"] else None, plan=got["plan"])
                if cuda and got["plan"] is not None and name != "ours, deepspeed":  # the memory plan's (FSDP2's)
                    tokens = min(got["plan"]["micro_batch_tokens"] or real, real)
                    row["estimate_gib"] = estimate(shape, tokens, 1, got["plan"]["checkpointing"]).total / 2**30
            figures[f"{name} [{key}]"] = row
    for row in figures.values():
        plain = figures.get(f"plain [{row['batch']}]", {})
        if "seconds_per_step" in row and "seconds_per_step" in plain:
            row["vs_plain"] = plain["seconds_per_step"] / row["seconds_per_step"]
    real_tokens, padded_tokens = figures["ours [default]"]["real_tokens"], figures["ours [default]"]["padded_tokens"]
    memory = logprob_memory(args) if args.logprob_tokens else []
    mem_ratio = None
    for tokens in args.logprob_tokens:
        got = {r["path"]: r for r in memory if r["tokens"] == tokens}
        mem_ratio = got["chunked"]["peak_bytes"] / got["full"]["peak_bytes"]  # an upper bound where full did not fit
    ours = figures["ours [default]"]
    result = {
        "benchmark": "gpu_learner", "machine": machine_info(),
        "config": {**{k: v for k, v in vars(args).items() if k not in ("out", "logprob_worker")}, "model": SHAPES[args.shape],
                   "vocab": vocab, "parameters": params, "real_tokens": real_tokens, "padded_tokens": padded_tokens,
                   "device": device, "precision": precision, "bf16_peak_flops": peak_flops},
        "figures": figures, "op_counts": ops, "logprob_memory": memory,
        "headline": (headline("real-token MFU of ours", ours.get("mfu"), ">= 0.20 at 0.5B, >= 0.30 at 1.5B",
                              None, "") if peak_flops else
                     headline("log-prob path peak memory, chunked / full logits (8k tokens, vocab 151,936)",
                              mem_ratio, "<= 0.125", None if mem_ratio is None else mem_ratio <= 0.125, "")),
    }
    print(f"\ngpu_learner  {device} | {args.shape}: {params / 1e6:.1f}M params, vocab {vocab} | default batch {args.batch} "
          f"sequences, {real_tokens} real tokens in {padded_tokens} padded | {precision} | {args.reps} reps "
          f"(+{args.warmup}), medians; each side alone on the device")
    print_table(["side [batch]", "seqs", "real tok", "s/step", "real tok/s", "MFU", "peak GiB", "plan GiB", "ckpt",
                 "x plain"],
                [[n, f["sequences"], f["real_tokens"], f.get("seconds_per_step"), f.get("real_tokens_per_s"), f.get("mfu"),
                  f.get("peak_memory_gib"), f.get("estimate_gib"), (f.get("plan") or {}).get("checkpointing"),
                  f.get("vs_plain")] if "error" not in f else
                 [n, f["sequences"], f["real_tokens"], f["error"][:40], None, None, None, None, None, None]
                 for n, f in figures.items()],
                ["{}", "{}", "{}", "{:.3f}", "{:.0f}", "{:.1%}", "{:.2f}", "{:.2f}", "{}", "{:.2f}"])
    if ops:
        print(f"aten ops per step (CPU dispatch, ours): {ops['aten_ops_per_step']} ({ops['copies_per_step']} copies/casts); "
              f"forward ops per decoder layer per micro-batch: "
              f"{ops['forward_aten_ops_per_decoder_layer_per_micro_batch']:.0f}")
    if memory:
        print_table(["log-prob path", "tokens", "peak above inputs"],
                    [[r["path"], r["tokens"], f"{r['peak_bytes'] / 2**30:.2f} GiB" if r["fits"] else
                      f"> {args.full_limit_gib:.0f} GiB (did not fit)"] for r in memory], ["{}", "{}", "{}"])
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
