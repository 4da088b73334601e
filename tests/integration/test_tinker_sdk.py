"""`rlhf-cluster tinker` joined to a Ray cluster (the session's), driven by the `tinker` SDK's own client, unmodified:
learner ranks and a vLLM engine behind it, the tiny model as the base.

- an SFT loop (`cross_entropy`, `optim_step`) lowers its loss;
- an RL loop in the shape of the cookbook's `recipes/rl_loop.py` (sample a group with the weights
  just saved for the sampler, reward, centre, `forward_backward` with `importance_sampling`,
  `optim_step`) raises its reward on the arithmetic task (its verifier's `correct` plus its dense
  `digits` term, so a random model has a signal);
- two clients training at once on one base model leave each other alone;
- after a restart on the same `state_dir`, a saved state (with its optimizer) and saved sampler
  weights load and give what they gave before;
- tinker-cookbook's own `recipes/sl_loop.py` and `recipes/rl_loop.py`, unmodified, run to completion
  with their data and tokenizer from local files: run in a folder laid out as the hub ids they name
  (`datasets.load_dataset` and `AutoTokenizer.from_pretrained` read an existing local folder of
  that name first), and the server serves the tiny model under the recipes' default model name.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

tinker = pytest.importorskip("tinker")

from tinker import types  # noqa: E402

from rlhf_cluster.data.tasks import arithmetic_rows, verify_arithmetic  # noqa: E402

KEY = "tml-integration"
NAME = "Qwen/Qwen3.5-9B-Base"  # the cookbook recipes' default model, mapped by the server's config to the tiny model
TINY = {"initializer_range": 0.2, "max_position_embeddings": 1024}  # room for rl_loop's few-shot prompt
REPO = Path(__file__).resolve().parents[2]


class Server:
    """`rlhf-cluster tinker CONFIG` in a subprocess; `url` once it prints it."""

    def __init__(self, config: Path, logs: Path):
        self.config, self.logs, self.starts = config, logs, 0
        self.start()

    def start(self) -> None:
        self.starts += 1
        self.log = self.logs / f"server-{self.starts}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "actors.commands.cli", "tinker", str(self.config)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=open(self.log, "w"),
            text=True,
        )
        self.url = self._wait_for_url(timeout=180)

    def _wait_for_url(self, timeout: float) -> str:
        found: list[str] = []

        def read():
            for line in self.proc.stdout:  # type: ignore[union-attr]
                if line.startswith("tinker: serving") and not found:
                    found.append(line.rsplit(" at ", 1)[1].split()[0])

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"the server did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        return found[0]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the server did not stop within 60 s of SIGTERM") from None


@pytest.fixture(scope="module")
def config(tmp_path_factory, model_cache, ray_cluster) -> Path:
    root = tmp_path_factory.mktemp("tinker")
    cfg = {
        "token": KEY,
        "port": 0,
        # The session's Ray, joined as a cluster is (a head of its own per server start is ~3 s and its
        # shutdown; the server's actors end with its process either way).
        "ray_address": ray_cluster.get_runtime_context().gcs_address,
        "state_dir": str(root / "state"),
        "session_timeout_s": 120,
        "model": {"name": NAME, "cache_dir": model_cache, "max_context_length": 1024, "tiny": TINY},
        "lora": {"max_rank": 32, "alpha": 16, "max_clients": 6},
    }
    path = root / "tinker.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def server(config, tmp_path_factory):
    s = Server(config, tmp_path_factory.mktemp("logs"))
    yield s
    if s.proc.poll() is None:
        s.stop()


@pytest.fixture
def client(server, monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    with tinker.ServiceClient(base_url=server.url, api_key=KEY) as client:  # finishes its session after
        yield client


def _sft_datum(tok, row: dict) -> types.Datum:
    prompt, answer = tok.encode(row["prompt"]), tok.encode(row["answer"]) + [tok.eos_token_id]
    tokens = prompt + answer
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(answer)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


def _mean_nll(out, data) -> float:
    total = sum(
        -(lp * w).sum()
        for o, d in zip(out.loss_fn_outputs, data)
        for lp, w in [(o["logprobs"].to_numpy(), d.loss_fn_inputs["weights"].to_numpy())]
    )
    return float(total) / sum(float(d.loss_fn_inputs["weights"].to_numpy().sum()) for d in data)


def test_an_sft_loop_lowers_its_loss(client):
    tc = client.create_lora_training_client(base_model=NAME, rank=8, seed=0).result()
    tok = tc.get_tokenizer()
    data = [_sft_datum(tok, r) for r in arithmetic_rows(16, seed=0)]
    losses = []
    for _ in range(10):
        out = tc.forward_backward(data, "cross_entropy").result()
        losses.append(_mean_nll(out, data))
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    print("SFT mean NLL per step:", [round(x, 3) for x in losses])
    assert losses[-1] < 0.5 * losses[0], losses


def _rl_step(tc, tok, rows, group: int, lr: float) -> float:
    """One step of the cookbook's rl_loop: returns the mean reward of the step's samples."""
    sampler = tc.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=6, stop=[tok.eos_token_id], temperature=1.0)
    prompts = [types.ModelInput.from_ints(tok.encode(r["prompt"])) for r in rows]
    futures = [sampler.sample(prompt=p, num_samples=group, sampling_params=params) for p in prompts]
    datums, rewards = [], []
    for future, prompt, row in zip(futures, prompts, rows):
        seqs = future.result().sequences
        scores = [
            sum(verify_arithmetic(tok.decode(s.tokens, skip_special_tokens=True), row["answer"]).values()) for s in seqs
        ]
        rewards += scores
        mean = statistics.mean(scores)
        if all(r == mean for r in scores):
            continue
        for s, r in zip(seqs, scores):
            ob_len = prompt.length - 1
            model_input = prompt.append(types.EncodedTextChunk(tokens=s.tokens[:-1]))
            datums.append(
                types.Datum(
                    model_input=model_input,
                    loss_fn_inputs={
                        "target_tokens": [0] * ob_len + s.tokens,
                        "logprobs": [0.0] * ob_len + s.logprobs,
                        "advantages": [0.0] * ob_len + [r - mean] * (model_input.length - ob_len),
                    },
                )
            )
    if datums:
        tc.forward_backward(datums, "importance_sampling").result()
        tc.optim_step(types.AdamParams(learning_rate=lr)).result()
    return statistics.mean(rewards)


def test_an_rl_loop_shaped_as_the_cookbooks_raises_its_reward(client):
    tc = client.create_lora_training_client(base_model=NAME, rank=8, seed=0).result()
    tok = tc.get_tokenizer()
    rows = arithmetic_rows(160, seed=1)
    rewards = [_rl_step(tc, tok, rows[i * 8 : (i + 1) * 8], group=8, lr=3e-2) for i in range(12)]
    print("RL mean reward per step:", [round(x, 3) for x in rewards])
    first, last = statistics.mean(rewards[:4]), statistics.mean(rewards[-4:])
    assert last - first >= 0.3, rewards


def _probe(tc, tok) -> list[float]:
    datum = _sft_datum(tok, {"prompt": "12+30=", "answer": "42"})
    return tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()


def _train(tc, tok, rows, steps: int) -> None:
    for _ in range(steps):
        tc.forward_backward([_sft_datum(tok, r) for r in rows], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()


def test_two_clients_training_at_once_leave_each_other_alone(client):
    a, b, alone = (client.create_lora_training_client(base_model=NAME, rank=4, seed=7).result() for _ in range(3))
    tok = a.get_tokenizer()
    rows_a, rows_b = arithmetic_rows(8, seed=2), arithmetic_rows(8, seed=3)
    threads = [threading.Thread(target=_train, args=(c, tok, rows, 4)) for c, rows in ((a, rows_a), (b, rows_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    _train(alone, tok, rows_a, 4)
    assert _probe(a, tok) == _probe(alone, tok)  # B's steps between A's changed nothing of A's
    assert _probe(b, tok) != _probe(a, tok)


def test_saved_states_survive_a_restart(server, monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    with tinker.ServiceClient(base_url=server.url, api_key=KEY) as client:
        tc = client.create_lora_training_client(base_model=NAME, rank=4, seed=3).result()
        tok = tc.get_tokenizer()
        _train(tc, tok, arithmetic_rows(8, seed=4), 2)
        state = tc.save_state("before-restart").result().path
        for_sampler = tc.save_weights_for_sampler("before-restart").result().path
        _train(tc, tok, arithmetic_rows(8, seed=5), 1)  # the step a resumed client must take alike
        expected = _probe(tc, tok)
        prompt = types.ModelInput.from_ints(tok.encode("3+4="))
        seeded = types.SamplingParams(max_tokens=4, temperature=1.0, seed=11)
        sampled = client.create_sampling_client(model_path=for_sampler).result().sample(prompt, 1, seeded).result()

    assert server.stop() == 0
    server.start()  # the module's server from now on: the same config and state_dir
    with tinker.ServiceClient(base_url=server.url, api_key=KEY) as client:
        resumed = client.create_training_client_from_state_with_optimizer(state).result()
        _train(resumed, tok, arithmetic_rows(8, seed=5), 1)
        assert _probe(resumed, tok) == pytest.approx(expected, abs=1e-5)
        sampler = client.create_sampling_client(model_path=for_sampler).result()
        assert sampler.sample(prompt, 1, seeded).result().sequences[0].tokens == sampled.sequences[0].tokens


def _hub_layout(root: Path, model_cache: str) -> Path:
    """A folder laid out as the hub ids the recipes load: the tiny tokenizer as the default model,
    chat rows as HuggingFaceH4/no_robots, arithmetic word problems as openai/gsm8k's `main`."""
    import shutil

    from rlhf_cluster.config import TinyModelConfig
    from rlhf_cluster.models.tiny_model import ensure_tiny_model

    shutil.copytree(ensure_tiny_model(TinyModelConfig(**TINY), model_cache), root / NAME)
    rows = arithmetic_rows(8, seed=6)
    chats = root / "HuggingFaceH4" / "no_robots"
    chats.mkdir(parents=True)
    chats.joinpath("train.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {r['prompt'][:-1]}?"},
                        {"role": "assistant", "content": r["answer"]},
                    ]
                }
            )
            + "\n"
            for r in rows
        )
    )
    gsm8k = root / "openai" / "gsm8k"
    (gsm8k / "main").mkdir(parents=True)
    gsm8k.joinpath("README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train.jsonl\n---\n"
    )
    gsm8k.joinpath("main", "train.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "question": f"What is {r['prompt'][:-1]}?",
                    "answer": f"{r['prompt']}{r['answer']}\n#### {r['answer']}",
                }
            )
            + "\n"
            for r in rows
        )
    )
    return root


@pytest.mark.parametrize(
    "recipe, args",
    [
        ("sl_loop", ["batch_size=4"]),
        ("rl_loop", ["batch_size=2", "group_size=4", "max_tokens=16", "loss_fn=importance_sampling"]),
    ],
)
def test_the_cookbooks_recipes_run_to_completion(server, model_cache, tmp_path, recipe, args):
    pytest.importorskip("tinker_cookbook")
    root = _hub_layout(tmp_path / "hub", model_cache)
    log_path = tmp_path / "log"
    env = {
        **os.environ,
        "TINKER_API_KEY": KEY,
        "TINKER_TELEMETRY": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            f"tinker_cookbook.recipes.{recipe}",
            f"base_url={server.url}",
            f"log_path={log_path}",
            *args,
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    steps = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == (2 if recipe == "sl_loop" else 4), steps
    final = [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines()][-1]
    assert final["name"] == "final" and final["state_path"].startswith("tinker://")
    assert final["sampler_path"].startswith("tinker://")
