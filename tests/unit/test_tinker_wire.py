"""The JSON side of the Tinker wire (rlhf_cluster/tinker/wire.py) and checkpoint paths (paths.py):
requests as the SDK serialises them parse here and convert to the records backends take; every
response built here validates as the SDK's own type of the same name; what the server does not
serve is refused with a `WireError` naming the field."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

from rlhf_cluster.tinker import records, replies, wire
from rlhf_cluster.tinker.paths import TinkerPath, model_folder_name, state_folder
from rlhf_cluster.tinker.proto import WireError


def _as_sent(request) -> bytes:
    """A request body exactly as the SDK's resources post it."""
    from tinker._compat import model_dump

    return json.dumps(model_dump(request, exclude_unset=False, exclude_none=True, mode="json")).encode()


def _prompt(tinker, tokens):
    return tinker.types.ModelInput.from_ints(tokens)


def test_sdk_training_requests_parse_and_convert():
    tinker = pytest.importorskip("tinker")
    t = tinker.types
    create = wire.parse_body(
        wire.CreateModelRequest,
        _as_sent(
            t.CreateModelRequest(
                session_id="s1",
                model_seq_id=0,
                base_model="tiny",
                lora_config=t.LoraConfig(rank=8, seed=3, train_unembed=False),
                user_metadata={"who": "me"},
            )
        ),
    )
    assert wire.lora_spec(create) == records.LoraSpec(rank=8, seed=3, train_unembed=False)
    assert create.optimizer_config.type == "adamw"

    adam = t.AdamParams(learning_rate=3e-4, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0)
    step = wire.parse_body(
        wire.OptimStepRequest, _as_sent(t.OptimStepRequest(adam_params=adam, model_id="m", seq_id=4))
    )
    assert step.seq_id == 4
    assert wire.adam_params(step) == records.AdamParams(
        learning_rate=3e-4, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0
    )

    save = wire.parse_body(wire.SaveWeightsRequest, _as_sent(t.SaveWeightsRequest(model_id="m", path="ck1", seq_id=5)))
    assert (save.path, save.overwrite, save.ttl_seconds) == ("ck1", False, None)
    sampler = wire.parse_body(
        wire.SaveWeightsForSamplerRequest,
        _as_sent(t.SaveWeightsForSamplerRequest(model_id="m", sampling_session_seq_id=2, seq_id=6)),
    )
    assert (sampler.path, sampler.sampling_session_seq_id, sampler.kind) == (None, 2, "snapshot")

    into = wire.parse_body(
        wire.LoadWeightsRequest,
        _as_sent(
            t.LoadWeightsRequest(model_id="s1:train:0", seq_id=1, path="tinker://s1:train:0/weights/a", optimizer=True)
        ),
    )
    assert not into.creates_model and into.target_model_id == "s1:train:0" and into.optimizer
    via = wire.parse_body(
        wire.LoadWeightsRequest,
        _as_sent(
            t.LoadWeightsRequest(session_id="s2", model_seq_id=3, path="tinker://s1:train:0/weights/a", optimizer=False)
        ),
    )
    assert via.creates_model and via.target_model_id == "s2:train:3"


def test_sdk_session_and_future_requests_parse():
    tinker = pytest.importorskip("tinker")
    t = tinker.types
    session = wire.parse_body(
        wire.CreateSessionRequest,
        _as_sent(t.CreateSessionRequest(tags=["a"], user_metadata=None, sdk_version="0.38.0")),
    )
    assert (session.tags, session.sdk_version, session.type) == (["a"], "0.38.0", "create_session")
    beat = wire.parse_body(wire.SessionHeartbeatRequest, _as_sent(t.SessionHeartbeatRequest(session_id="s1")))
    assert beat.session_id == "s1"
    assert wire.parse_body(wire.GetInfoRequest, _as_sent(t.GetInfoRequest(model_id="m"))).model_id == "m"
    sampling = wire.parse_body(
        wire.CreateSamplingSessionRequest,
        _as_sent(
            t.CreateSamplingSessionRequest(
                session_id="s1", sampling_session_seq_id=0, model_path="tinker://m/sampler_weights/x"
            )
        ),
    )
    assert (sampling.model_path, sampling.base_model) == ("tinker://m/sampler_weights/x", None)
    fut = wire.parse_body(wire.FutureRetrieveRequest, _as_sent(t.FutureRetrieveRequest(request_id="m:3")))
    assert (fut.request_id, fut.allow_metadata_only) == ("m:3", False)
    assert wire.parse_body(wire.UnloadModelRequest, _as_sent(t.UnloadModelRequest(model_id="m"))).model_id == "m"
    assert wire.parse_body(wire.ClientConfigRequest, _as_sent(t.ClientConfigRequest(sdk_version="0.38.0"))).sdk_version
    assert wire.parse_body(wire.CancelFutureRequest, b'{"request_id": "r"}').request_id == "r"
    assert wire.parse_body(wire.WeightsInfoRequest, b'{"tinker_path": "tinker://m/weights/a"}').tinker_path


@pytest.mark.parametrize(
    "stop, strings, ids",
    [(None, (), ()), ("\n\n", ("\n\n",), ()), (["User:", "###"], ("User:", "###"), ()), ([2, 151645], (), (2, 151645))],
)
def test_sample_request_stop_forms(stop, strings, ids):
    tinker = pytest.importorskip("tinker")
    params = tinker.types.SamplingParams(max_tokens=12, seed=5, stop=stop, temperature=0.7, top_p=0.9, top_k=20)
    request = tinker.types.SampleRequest(
        num_samples=4,
        prompt=_prompt(tinker, [1, 2, 3]),
        sampling_params=params,
        sampling_session_id="s:sample:0",
        seq_id=1,
    )
    req = wire.parse_body(wire.SampleRequest, _as_sent(request))
    assert wire.prompt_tokens(req.prompt) == [1, 2, 3]
    assert req.num_samples == 4
    assert wire.sample_spec(req) == records.SampleSpec(
        max_tokens=12, temperature=0.7, top_p=0.9, top_k=20, seed=5, stop_strings=strings, stop_token_ids=ids
    )


def test_sample_request_prompt_logprobs_and_defaults():
    tinker = pytest.importorskip("tinker")
    request = tinker.types.SampleRequest(
        prompt=_prompt(tinker, [4]), sampling_params=tinker.types.SamplingParams(), prompt_logprobs=True
    )
    spec = wire.sample_spec(wire.parse_body(wire.SampleRequest, _as_sent(request)))
    assert spec.prompt_logprobs and spec.max_tokens == records.SampleSpec().max_tokens and spec.top_k == -1
    big_seed = tinker.types.SampleRequest(
        prompt=_prompt(tinker, [4]), sampling_params=tinker.types.SamplingParams(seed=2**64 - 1)
    )
    assert 0 <= wire.sample_spec(wire.parse_body(wire.SampleRequest, _as_sent(big_seed))).seed < 2**63 - 1


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"topk_prompt_logprobs": 3}, "topk_prompt_logprobs"),
        ({"topk_sample_logprobs": 2}, "topk_sample_logprobs"),
        ({"prompt_alt_tokens_k": 1}, "prompt_alt_tokens_k"),
        ({"prompt_logprobs": True, "prompt_logprobs_last_n": 1}, "prompt_logprobs_last_n"),
        ({"num_samples": 0}, "num_samples"),
    ],
)
def test_unserved_sample_fields_name_the_field(extra, field):
    tinker = pytest.importorskip("tinker")
    request = tinker.types.SampleRequest(
        prompt=_prompt(tinker, [4, 5]), sampling_params=tinker.types.SamplingParams(max_tokens=3), **extra
    )
    with pytest.raises(WireError) as e:
        wire.sample_spec(wire.parse_body(wire.SampleRequest, _as_sent(request)))
    assert e.value.field == field


def test_unserved_prompts_and_params_name_the_field():
    tinker = pytest.importorskip("tinker")
    t = tinker.types
    target = {"data": [1, 2], "dtype": "int64", "shape": [2, 1]}
    cases = [
        (
            t.SampleRequest(
                prompt=_prompt(tinker, [4, 5, 6]), sampling_params=t.SamplingParams(), target_prompt_logprobs=target
            ),
            "target_prompt_logprobs",
        ),
        (
            t.SampleRequest(
                prompt=t.ModelInput(
                    chunks=[t.EncodedTextChunk(tokens=[1]), t.ImageChunk(data=b"x", format="png", expected_tokens=1)]
                ),
                sampling_params=t.SamplingParams(),
            ),
            "prompt.chunks[1]",
        ),
        (
            t.SampleRequest(prompt=_prompt(tinker, [1]), sampling_params=t.SamplingParams(stop=[])),
            "sampling_params.stop",
        ),
        (
            t.SampleRequest(prompt=_prompt(tinker, [1]), sampling_params=t.SamplingParams(top_p=0.0)),
            "sampling_params.top_p",
        ),
        (
            t.SampleRequest(prompt=_prompt(tinker, [1]), sampling_params=t.SamplingParams(max_tokens=0)),
            "sampling_params.max_tokens",
        ),
    ]
    for request, field in cases:
        with pytest.raises(WireError) as e:
            wire.sample_spec(wire.parse_body(wire.SampleRequest, _as_sent(request)))
        assert e.value.field == field, request


def test_unserved_training_requests_name_the_field():
    tinker = pytest.importorskip("tinker")
    t = tinker.types
    full = wire.parse_body(
        wire.CreateModelRequest, _as_sent(t.CreateModelRequest(session_id="s", model_seq_id=0, base_model="b"))
    )
    with pytest.raises(WireError, match="full fine-tuning") as e:
        wire.lora_spec(full)
    assert e.value.field == "lora_config"

    dimuon = t.CreateModelRequest(
        session_id="s",
        model_seq_id=0,
        base_model="b",
        lora_config=t.LoraConfig(rank=4),
        optimizer_config=t.DimuonOptimizerConfig(),
    )
    with pytest.raises(WireError, match="dimuon") as e:
        wire.lora_spec(wire.parse_body(wire.CreateModelRequest, _as_sent(dimuon)))
    assert e.value.field == "optimizer_config.type"

    step = t.OptimStepRequest(optim_params=t.DimuonParams(learning_rate=0.1), model_id="m")
    with pytest.raises(WireError, match="dimuon") as e:
        wire.adam_params(wire.parse_body(wire.OptimStepRequest, _as_sent(step)))
    assert e.value.field == "optimizer_params"

    with pytest.raises(WireError) as e:
        wire.adam_params(wire.parse_body(wire.OptimStepRequest, b'{"model_id": "m", "adam_params": {"beta2": 1.5}}'))
    assert e.value.field == "adam_params.beta2"


def test_parse_body_errors_name_the_field_and_extra_fields_pass():
    with pytest.raises(WireError) as e:
        wire.parse_body(wire.SaveWeightsRequest, b"{not json")
    assert e.value.field == "body"
    with pytest.raises(WireError) as e:
        wire.parse_body(wire.SaveWeightsRequest, b"[1]")
    assert e.value.field == "body"
    with pytest.raises(WireError) as e:
        wire.parse_body(wire.CreateModelRequest, {"session_id": "s", "base_model": "b"})
    assert e.value.field == "model_seq_id"
    with pytest.raises(WireError) as e:
        wire.parse_body(wire.SampleRequest, {"prompt": {"chunks": []}, "sampling_params": {"top_k": "many"}})
    assert e.value.field == "sampling_params.top_k"
    with pytest.raises(WireError) as e:
        wire.parse_body(
            wire.LoadWeightsRequest, {"path": "tinker://m/weights/a", "optimizer": False, "session_id": "s"}
        )
    assert e.value.field == "model_id"
    newer = wire.parse_body(wire.GetInfoRequest, {"model_id": "m", "a_field_from_a_newer_sdk": 1})
    assert newer.model_id == "m"


def _sdk_type(name: str):
    """The SDK's pydantic type of that name, wherever 0.38.0 keeps it."""
    tinker = pytest.importorskip("tinker")
    for module in ("tinker.types", "tinker.types.shared", "tinker.types.try_again_response"):
        found = getattr(importlib.import_module(module), name, None)
        if found is not None:
            return found
    raise AssertionError(f"the SDK has no type {name} ({tinker.__version__})")


RESPONSES = [
    replies.UntypedAPIFuture(request_id="s:sample:0:1", sample_sequence_ids=["a", "b"]),
    replies.UntypedAPIFuture(request_id="m:2", model_id="m"),
    replies.TryAgainResponse(request_id="m:2"),
    replies.RequestFailedResponse(error="loss_fn gspo is not served by this server", category="user"),
    replies.ClientConfigResponse(),
    replies.ClientDynamicConfigResponse(),
    replies.GetServerCapabilitiesResponse(
        supported_models=[replies.SupportedModel(model_name="tiny", max_context_length=512)]
    ),
    replies.HealthResponse(),
    replies.TelemetryResponse(),
    replies.CreateSessionResponse(session_id="s1"),
    replies.SessionHeartbeatResponse(),
    replies.CreateSamplingSessionResponse(sampling_session_id="s1:sample:0"),
    replies.CreateModelResponse(model_id="s1:train:0"),
    replies.GetInfoResponse(
        model_data=replies.ModelData(arch="llama", model_name="tiny", tokenizer_id="/models/tiny"),
        model_id="s1:train:0",
        lora_rank=8,
        model_name="tiny",
    ),
    replies.OptimStepResponse(metrics={"grad_norm:mean": 0.5}),
    replies.OptimStepResponse(),
    replies.SaveWeightsResponse(path="tinker://s1:train:0/weights/ck"),
    replies.LoadWeightsResponse(path="tinker://s1:train:0/weights/ck", model_id="s2:train:0"),
    replies.SaveWeightsForSamplerResponseInternal(path="tinker://s1:train:0/sampler_weights/ck"),
    replies.SaveWeightsForSamplerResponseInternal(sampling_session_id="s1:sample:3"),
    replies.GetSamplerResponse(sampler_id="s1:sample:3", base_model="tiny", model_path="tinker://m/sampler_weights/x"),
    replies.WeightsInfoResponse(base_model="tiny", lora_rank=8, train_unembed=False, train_mlp=True, train_attn=True),
    replies.UnloadModelResponse(model_id="m"),
]


@pytest.mark.parametrize("response", RESPONSES, ids=lambda r: type(r).__name__)
def test_responses_validate_as_the_sdks_types(response):
    sdk_cls = _sdk_type(type(response).__name__)
    body = json.loads(json.dumps(response.model_dump(mode="json")))
    parsed = sdk_cls.model_validate(body)
    for name, value in body.items():
        theirs = getattr(parsed, name)
        theirs = theirs.model_dump(mode="json") if hasattr(theirs, "model_dump") else theirs
        if isinstance(value, list):
            theirs = [x.model_dump(mode="json") if hasattr(x, "model_dump") else x for x in theirs]
        assert theirs == value, (name, theirs, value)


def test_every_response_model_is_checked_against_the_sdk():
    checked = {type(r).__name__ for r in RESPONSES} | {"SupportedModel", "ModelData"}  # the last two nested
    assert {cls.__name__ for cls in replies._Response.__subclasses__()} == checked


def test_client_config_speaks_only_what_the_server_serves():
    sdk = _sdk_type("ClientConfigResponse").model_validate(replies.ClientConfigResponse().model_dump(mode="json"))
    assert not (sdk.proto_compress_fwdbwd or sdk.parallel_fwdbwd_chunks or sdk.use_pyqwest_transport)
    assert not (sdk.sample_use_retrieve_futures or sdk.custom_loss_server_side or sdk.sample_join_sampling_session)
    assert not sdk.pjwt_auth_enabled and sdk.fwdbwd_max_chunk_len == 1024


def test_tinker_paths_round_trip_and_match_the_sdk():
    path = TinkerPath.parse("tinker://0f3a-9c:train:0/sampler_weights/step-000010")
    assert (path.model_id, path.kind, path.name) == ("0f3a-9c:train:0", "sampler_weights", "step-000010")
    assert path.uri == "tinker://0f3a-9c:train:0/sampler_weights/step-000010"
    assert TinkerPath("m:train:1", "weights", "final").uri == "tinker://m:train:1/weights/final"
    folder = state_folder("/state", path)
    assert folder == Path("/state/0f3a-9c+train+0/sampler_weights/step-000010")
    assert model_folder_name("a:train:1") != model_folder_name("a:train1")

    tinker = pytest.importorskip("tinker")
    parsed = tinker.types.ParsedCheckpointTinkerPath.from_tinker_path(path.uri)
    assert (parsed.training_run_id, parsed.checkpoint_type) == ("0f3a-9c:train:0", "sampler")


@pytest.mark.parametrize(
    "bad",
    [
        "s3://bucket/x",
        "tinker://m/weights",
        "tinker://m/checkpoints/a",
        "tinker://m/weights/a/b",
        "tinker://m/weights/..",
        "tinker://m+x/weights/a",
        "tinker:///weights/a",
    ],
)
def test_bad_tinker_paths_name_the_path_and_the_form(bad):
    with pytest.raises(ValueError, match=re.escape("tinker://<model_id>/<weights|sampler_weights>/<name>")) as e:
        TinkerPath.parse(bad)
    assert repr(bad) in str(e.value)
