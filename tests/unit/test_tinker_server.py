"""The Tinker server's routes, futures and errors, driven by the SDK's own client (unmodified)
against in-process backends that record what they were asked: every call the SDK's training and
sampling clients make reaches the backend with the right arguments and comes back in the shape the
SDK reads; bad requests get the SDK's errors and never stop the server."""

from __future__ import annotations

import json

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")

from tinker import types  # noqa: E402

from rlhf_cluster.config.tinker import TinkerConfig  # noqa: E402
from rlhf_cluster.tinker.records import SampledSequence, SampleResult  # noqa: E402
from tests.tinker_server import KEY, served  # noqa: E402

NAME = "test-org/tiny"


class FakeTrain:
    """A training backend whose 'model' is a step counter per client: log-probs are -1 - steps."""

    def __init__(self):
        self.models: dict[str, dict] = {}
        self.calls: list[tuple] = []

    def create(self, model_id, lora):
        self.models[model_id] = {"steps": 0, "pending": 0, "rank": lora.rank}

    def free(self, model_id):
        self.models.pop(model_id)

    def forward_backward(self, model_id, datums, loss_fn, config, backward):
        m = self.models[model_id]
        self.calls.append(("forward_backward", model_id, loss_fn, dict(config), backward, [d.length for d in datums]))
        if backward:
            m["pending"] += sum(d.length for d in datums)
        return [np.full(d.length, -1.0 - m["steps"], np.float32) for d in datums], {"loss:sum": 1.5}

    def optim_step(self, model_id, adam):
        m = self.models[model_id]
        self.calls.append(("optim_step", model_id, adam.learning_rate, m["pending"]))
        m["steps"], m["pending"] = m["steps"] + 1, 0
        return {"lr:mean": adam.learning_rate}

    def save(self, model_id, folder, optimizer):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "state.json").write_text(json.dumps(self.models[model_id]))

    def load(self, model_id, folder, optimizer):
        self.models[model_id] = json.loads((folder / "state.json").read_text())

    def export_adapter(self, model_id, folder):
        folder.mkdir(parents=True, exist_ok=True)
        return f"steps-{self.models[model_id]['steps']}"


class FakeSample:
    """Samples `max_tokens` copies of the last prompt token; log-probs name the adapter's digest."""

    def __init__(self):
        self.adapters: dict[str, str] = {}

    def add_adapter(self, name, folder, digest):
        self.adapters[name] = digest

    def remove_adapter(self, name):
        del self.adapters[name]

    def sample(self, adapter, prompt, n, spec):
        lp = -float(self.adapters[adapter].split("-")[1]) - 0.5 if adapter else -0.25
        seqs = [SampledSequence([prompt[-1]] * spec.max_tokens, [lp] * spec.max_tokens, "length") for _ in range(n)]
        return SampleResult(seqs, [None] + [-0.1] * (len(prompt) - 1) if spec.prompt_logprobs else None)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = TinkerConfig(
        token=KEY, state_dir=str(tmp_path_factory.mktemp("tinker-state")), model={"name": NAME}, long_poll_s=2.0
    )
    train, sample = FakeTrain(), FakeSample()
    with served(cfg, train, sample, tokenizer_dir="/nonexistent") as (url, service):
        yield url, service, train, sample


@pytest.fixture
def client(server, monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    with tinker.ServiceClient(base_url=server[0], api_key=KEY) as client:  # finishes its session after
        yield client


def _datum(n: int) -> types.Datum:
    tokens = list(range(1, n + 1))
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs={"target_tokens": tokens, "weights": [1.0] * n}
    )


def test_training_calls_reach_the_backend_in_order_and_answer_as_the_sdk_reads(client, server):
    _, service, train, _ = server
    capabilities = tinker.RestClient(base_url=server[0], api_key=KEY).get_server_capabilities().result()
    assert [m.model_name for m in capabilities.supported_models] == [NAME]
    tc = client.create_lora_training_client(base_model=NAME, rank=4).result()
    out = tc.forward_backward([_datum(3), _datum(5)], "cross_entropy").result()
    assert [len(o["logprobs"].tolist()) for o in out.loss_fn_outputs] == [3, 5]
    assert out.metrics["loss:sum"] == pytest.approx(1.5)
    tc.forward_backward([_datum(2)], "cross_entropy").result()
    step = tc.optim_step(types.AdamParams(learning_rate=3e-3)).result()
    assert step.metrics == {"lr:mean": pytest.approx(3e-3)}
    model_id = tc.model_id
    mine = [c for c in train.calls if c[1] == model_id]
    # gradients of both calls were pending when the step ran, and only then cleared
    assert mine[-1] == ("optim_step", model_id, pytest.approx(3e-3), 10)
    after = tc.forward([_datum(2)], "cross_entropy").result()
    assert after.loss_fn_outputs[0]["logprobs"].tolist() == [-2.0, -2.0]  # one step taken
    assert train.calls[-1][4] is False  # forward only
    assert service.futures.in_flight() == 0


def test_saved_state_loads_into_a_new_client_and_samplers_sample_its_adapter(client):
    tc = client.create_lora_training_client(base_model=NAME, rank=4).result()
    tc.forward_backward([_datum(2)], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    path = tc.save_state("first").result().path
    assert path == f"tinker://{tc.model_id}/weights/first"
    again = client.create_training_client_from_state_with_optimizer(path).result()
    out = again.forward([_datum(2)], "cross_entropy").result()
    assert out.loss_fn_outputs[0]["logprobs"].tolist() == [-2.0, -2.0]

    sampler = tc.save_weights_and_get_sampling_client().result()
    res = sampler.sample(types.ModelInput.from_ints([5, 6, 7]), 3, types.SamplingParams(max_tokens=4)).result()
    assert len(res.sequences) == 3 and all(s.tokens == [7, 7, 7, 7] for s in res.sequences)
    assert res.sequences[0].logprobs == [pytest.approx(-1.5)] * 4  # the adapter after one step
    assert len({s.sequence_id for s in res.sequences}) == 3

    named = tc.save_weights_for_sampler("for-later").result().path
    by_path = client.create_sampling_client(model_path=named).result()
    res = by_path.sample(
        types.ModelInput.from_ints([9]), 1, types.SamplingParams(max_tokens=2), include_prompt_logprobs=True
    ).result()
    assert res.sequences[0].tokens == [9, 9]
    base = client.create_sampling_client(base_model=NAME).result()
    assert base.sample(types.ModelInput.from_ints([3]), 1, types.SamplingParams(max_tokens=1)).result().sequences[
        0
    ].logprobs == [pytest.approx(-0.25)]


def test_bad_requests_get_the_sdks_errors_and_the_server_keeps_serving(client, server):
    url = server[0]
    with pytest.raises(tinker.BadRequestError, match="is not served here"):
        client.create_lora_training_client(base_model="other/model", rank=4).result()
    tc = client.create_lora_training_client(base_model=NAME, rank=4).result()
    with pytest.raises(tinker.BadRequestError, match="gspo"):
        tc.forward_backward([_datum(2)], "gspo").result()
    bad = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [1, 2]})
    with pytest.raises(tinker.BadRequestError, match="target_tokens|weights"):
        tc.forward_backward([bad], "cross_entropy").result()
    with pytest.raises(tinker.NotFoundError):
        client.create_sampling_client(model_path=f"tinker://{tc.model_id}/sampler_weights/never-saved").result()
    with pytest.raises(tinker.NotFoundError, match="names no saved state"):  # as for a sampler (trial 23b T1)
        client.create_training_client_from_state(f"tinker://{tc.model_id}/weights/never-saved").result()
    with pytest.raises(tinker.AuthenticationError):
        tinker.RestClient(base_url=url, api_key="tml-wrong").get_server_capabilities().result()
    import httpx

    assert httpx.post(f"{url}/api/v1/join_sampling_session", headers={"X-API-Key": KEY}).status_code == 404
    missing = httpx.post(f"{url}/api/v1/create_session", json={"tags": []})  # no key at all
    assert missing.status_code == 401 and "X-API-Key" in missing.json()["detail"]
    assert httpx.get(f"{url}/api/v1/healthz").json() == {"status": "ok"}
    metrics = httpx.get(f"{url}/metrics").text
    assert "rlhf_tinker_requests_total{" in metrics and 'status="401"' in metrics


def test_a_sampler_of_a_deleted_checkpoint_is_refused_naming_it(client, server):
    tc = client.create_lora_training_client(base_model=NAME, rank=4).result()
    named = tc.save_weights_for_sampler("doomed").result().path
    sampler = client.create_sampling_client(model_path=named).result()
    tinker.RestClient(base_url=server[0], api_key=KEY).delete_checkpoint_from_tinker_path(named).result()
    with pytest.raises(tinker.NotFoundError, match="not a live sampler"):
        sampler.sample(types.ModelInput.from_ints([1]), 1, types.SamplingParams(max_tokens=1)).result()
    assert named not in server[3].adapters


def test_a_call_sent_twice_runs_once_and_an_ended_session_frees_its_clients(tmp_path):
    import asyncio

    from rlhf_cluster.tinker.futures import Outcome
    from rlhf_cluster.tinker.proto import ForwardBackwardCall
    from rlhf_cluster.tinker.records import Datum, LoraSpec
    from rlhf_cluster.tinker.service import ServiceError, TinkerService

    cfg = TinkerConfig(token=KEY, state_dir=str(tmp_path), model={"name": NAME}, session_timeout_s=0.05)
    train, sample = FakeTrain(), FakeSample()

    async def run():
        service = TinkerService(cfg, train, sample, tokenizer_dir="/nonexistent")
        sid = service.create_session([], {})
        created = service.create_model(sid, 0, NAME, LoraSpec(rank=2))
        assert isinstance(await service.retrieve(created), Outcome)
        model_id = service.sessions.model_id(sid, 0)
        tokens = np.arange(1, 4)
        call = ForwardBackwardCall(
            model_id,
            5,
            "cross_entropy",
            {},
            False,
            [Datum(tokens, {"target_tokens": tokens, "weights": np.ones(3, np.float32)})],
        )
        first, again = service.forward_backward(call), service.forward_backward(call)
        assert first == again and not (await service.retrieve(first)).failed
        assert sum(c[0] == "forward_backward" for c in train.calls) == 1
        await asyncio.sleep(0.1)
        await service.expire_sessions()
        assert model_id not in train.models and model_id not in service.sessions.clients
        with pytest.raises(ServiceError) as ended:
            service.heartbeat(sid)
        assert ended.value.status == 410
        assert await service.retrieve("never-made") is None
        # a session its client finishes frees its clients at once
        other = service.create_session([], {})
        assert isinstance(await service.retrieve(service.create_model(other, 0, NAME, LoraSpec(rank=2))), Outcome)
        await service.finish_session(other)
        assert service.sessions.model_id(other, 0) not in train.models
        with pytest.raises(ServiceError):
            await service.finish_session(other)
        service.close()

    asyncio.run(run())


def test_the_shipped_server_config_loads_and_a_token_without_the_sdks_prefix_is_refused(monkeypatch):
    from pathlib import Path

    from rlhf_cluster.config.base import ConfigError
    from rlhf_cluster.config.loading import load_model

    shipped = Path(__file__).resolve().parents[2] / "configs" / "tinker" / "server.yaml"
    cfg = load_model(TinkerConfig, shipped)
    monkeypatch.setenv(cfg.token_env, "secret")
    with pytest.raises(ValueError, match="RLHF_TINKER_TOKEN: must start with 'tml-'"):
        cfg.api_key()
    with pytest.raises(ConfigError, match="token: .*must start with 'tml-'"):
        load_model(TinkerConfig, shipped, ["token=abc"])


def test_a_custom_loss_runs_on_the_client_and_reaches_the_server_as_cross_entropy_weights(client, server):
    train = server[2]
    tc = client.create_lora_training_client(base_model=NAME, rank=4).result()

    def loss(data, logprobs):  # the SDK hands each datum's log-probs as a torch tensor
        total = sum((lp * lp.new_tensor(range(len(lp)))).sum() for lp in logprobs)
        return total, {"custom:sum": float(total)}

    out = tc.forward_backward_custom([_datum(3)], loss).result()
    assert out.metrics["custom:sum"] == pytest.approx(-3.0)  # log-probs -1 at positions 0, 1, 2
    kinds = [(c[2], c[4]) for c in train.calls if c[1] == tc.model_id]
    assert kinds == [("cross_entropy", False), ("cross_entropy", True)]  # a forward, then weighted backward


def test_a_clients_unnamed_sampler_saves_are_bounded_oldest_ending_first(client, server):
    from rlhf_cluster.tinker.service import UNNAMED_SAMPLERS_KEPT

    sample = server[3]
    tc = client.create_lora_training_client(base_model=NAME, rank=4).result()
    samplers = [tc.save_weights_and_get_sampling_client().result() for _ in range(UNNAMED_SAMPLERS_KEPT + 2)]
    mine = [name for name in sample.adapters if name.startswith(tc.model_id.split(":")[0])]
    assert len(mine) == UNNAMED_SAMPLERS_KEPT, mine  # the engines hold the newest only
    prompt, params = types.ModelInput.from_ints([1]), types.SamplingParams(max_tokens=1)
    assert samplers[-1].sample(prompt, 1, params).result().sequences
    with pytest.raises(tinker.NotFoundError, match="not a live sampler"):
        samplers[0].sample(prompt, 1, params).result()
