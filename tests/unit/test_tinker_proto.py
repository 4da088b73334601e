"""The protobuf payloads of the Tinker wire (rlhf_cluster/tinker/proto.py) against the SDK's own
conversion code: requests the SDK encodes decode here to the same tokens, loss inputs and config;
outputs encoded here decode in the SDK to the same values. Tests without the SDK round-trip through
this module's own descriptor pool."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf_cluster.tinker import proto
from rlhf_cluster.tinker.proto import WireError
from rlhf_cluster.tinker.records import SampledSequence, SampleResult


def _sdk_request(datums, loss_fn="cross_entropy", config=None, forward_only=False, seq_id=7):
    """Bytes exactly as the SDK's training resource sends them."""
    tinker = pytest.importorskip("tinker")
    from tinker.proto.request_conv import forward_backward_request_to_proto

    fb_input = tinker.types.ForwardBackwardInput(data=datums, loss_fn=loss_fn, loss_fn_config=config)
    request = tinker.types.ForwardBackwardRequest(forward_backward_input=fb_input, model_id="s1:train:0", seq_id=seq_id)
    msg = forward_backward_request_to_proto(request)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def _datum(tokens, **inputs):
    tinker = pytest.importorskip("tinker")
    return tinker.types.Datum(model_input=tinker.types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


def test_sdk_request_decodes_to_the_same_datums():
    tinker = pytest.importorskip("tinker")
    rl = _datum(
        [5, 6, 7, 8, 9],
        target_tokens=np.array([6, 7, 8, 9, 10]),
        logprobs=np.array([-0.5, -1.0, -2.0, -0.25, -3.0], dtype=np.float32),
        advantages=[0.0, 0.0, 1.5, 1.5, 1.5],
    )
    two_chunks = tinker.types.Datum(
        model_input=tinker.types.ModelInput(
            chunks=[tinker.types.EncodedTextChunk(tokens=[1, 2]), tinker.types.EncodedTextChunk(tokens=[100_000])]
        ),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": np.array([0.0, 1.0, 0.5])},
    )
    sft = _datum([3], target_tokens=[4], weights=[1.0])
    body = _sdk_request([rl, two_chunks, sft], "importance_sampling", forward_only=True)
    call = proto.decode_forward_backward(body)

    assert (call.model_id, call.seq_id, call.loss_fn, call.forward_only) == (
        "s1:train:0",
        7,
        "importance_sampling",
        True,
    )
    assert [d.length for d in call.datums] == [5, 3, 1]
    assert call.datums[1].tokens.tolist() == [1, 2, 100_000]
    assert call.datums[0].tokens.dtype == np.int64
    assert call.datums[0].inputs["target_tokens"].tolist() == [6, 7, 8, 9, 10]
    assert call.datums[0].inputs["target_tokens"].dtype == np.int64
    assert call.datums[0].inputs["logprobs"].tolist() == [-0.5, -1.0, -2.0, -0.25, -3.0]
    assert call.datums[0].inputs["advantages"].dtype == np.float32
    assert call.datums[0].inputs["advantages"].tolist() == [0.0, 0.0, 1.5, 1.5, 1.5]
    assert call.datums[1].inputs["weights"].tolist() == [0.0, 1.0, 0.5]
    assert {k: v.tolist() for k, v in call.datums[2].inputs.items()} == {"target_tokens": [4], "weights": [1.0]}
    assert call.loss_fn_config == {}


def test_loss_fn_config_numbers_and_strings_merge_v1_and_v2():
    body = _sdk_request([_datum([1], target_tokens=[2])], "ppo", config={"clip_low_threshold": 0.8, "mode": "token"})
    assert proto.decode_forward_backward(body).loss_fn_config == {"clip_low_threshold": 0.8, "mode": "token"}

    # An older SDK writes only the v1 map; where both are present v2 wins.
    msg = proto.new_message("ForwardBackwardRequest")
    msg.model_id, msg.loss_fn = "m", "ppo"
    msg.loss_fn_config["a"] = 1.0
    msg.loss_fn_config["b"] = 2.0
    msg.loss_fn_config_v2["b"].number = 3.0
    assert proto.decode_forward_backward(msg.SerializeToString()).loss_fn_config == {"a": 1.0, "b": 3.0}


def test_own_pool_round_trip_without_the_sdk():
    msg = proto.new_message("ForwardBackwardRequest")
    msg.model_id, msg.seq_id, msg.loss_fn = "m", 2, "cross_entropy"
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.array([4, 5], dtype="<i4").tobytes()
    t = datum.loss_fn_inputs["target_tokens"]
    t.dense, t.dtype = np.array([5, 6], dtype="<i4").tobytes(), proto.DTYPE_INT32
    w = datum.loss_fn_inputs["weights"]
    bf16 = (np.array([1.0, 0.5], dtype=np.float32).view(np.uint32) >> 16).astype("<u2")
    w.dense, w.dtype = bf16.tobytes(), proto.DTYPE_BFLOAT16
    w.shape.append(2)
    (d,) = proto.decode_forward_backward(msg.SerializeToString()).datums
    assert d.tokens.tolist() == [4, 5]
    assert d.inputs["target_tokens"].dtype == np.int64 and d.inputs["target_tokens"].tolist() == [5, 6]
    assert d.inputs["weights"].tolist() == [1.0, 0.5]


@pytest.mark.parametrize(
    "body, field",
    [(b"\xff\xff\xff\xff", "body"), (b"", "model_id"), (b"\x0a\x01m", "loss_fn")],
)
def test_garbage_bodies_name_the_field(body, field):
    with pytest.raises(WireError) as e:
        proto.decode_forward_backward(body)
    assert e.value.field == field


def test_unserved_chunks_and_tensor_forms_name_the_field():
    tinker = pytest.importorskip("tinker")
    image = tinker.types.Datum(
        model_input=tinker.types.ModelInput(
            chunks=[
                tinker.types.EncodedTextChunk(tokens=[1]),
                tinker.types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4),
            ]
        ),
        loss_fn_inputs={"target_tokens": [1, 2, 3, 4, 5]},
    )
    ok = _datum([1, 2], target_tokens=[2, 3])
    with pytest.raises(WireError, match="image") as e:
        proto.decode_forward_backward(_sdk_request([ok, image]))
    assert e.value.field == "data[1].model_input[1]"

    sparse = tinker.types.TensorData(
        data=[5, 6], dtype="int64", shape=[2, 3], sparse_crow_indices=[0, 1, 2], sparse_col_indices=[0, 2]
    )
    with pytest.raises(WireError, match="sparse") as e:
        proto.decode_forward_backward(_sdk_request([_datum([1, 2], target_tokens=sparse)]))
    assert e.value.field == "data[0].loss_fn_inputs.target_tokens"

    two_d = np.array([[2, 9], [3, 9]])
    with pytest.raises(WireError, match="2-D") as e:
        proto.decode_forward_backward(_sdk_request([_datum([1, 2], target_tokens=two_d)]))
    assert e.value.field == "data[0].loss_fn_inputs.target_tokens"

    with pytest.raises(WireError, match="expected 2 values") as e:
        proto.decode_forward_backward(_sdk_request([_datum([1, 2], target_tokens=[2, 3], weights=[1.0])]))
    assert e.value.field == "data[0].loss_fn_inputs.weights"

    floats = tinker.types.TensorData(data=[2.0, 3.0], dtype="float32", shape=[2])
    with pytest.raises(WireError, match="int64") as e:
        proto.decode_forward_backward(_sdk_request([_datum([1, 2], target_tokens=floats)]))
    assert e.value.field == "data[0].loss_fn_inputs.target_tokens"


def test_forward_backward_output_decodes_in_the_sdk():
    pytest.importorskip("tinker")
    from tinker.proto.response_conv import deserialize_forward_backward_output

    per_datum = [
        {"logprobs": np.array([-0.5, -1.25, -2.0]), "elementwise_loss": np.array([0.5, 1.25, 2.0], np.float32)},
        {"logprobs": np.array([-4.0], np.float32), "elementwise_loss": np.array([4.0])},
        {"logprobs": np.zeros(0, np.float32), "elementwise_loss": np.zeros(0)},
        {"logprobs": np.array([-0.125] * 5), "elementwise_loss": np.array([0.0] * 5)},
    ]
    metrics = {"loss:sum": 3.75, "tokens:sum": 9.0}
    out = deserialize_forward_backward_output(proto.encode_forward_backward_output(per_datum, metrics))
    assert out.loss_fn_output_type == "ArrayRecord"
    assert out.metrics == metrics
    assert len(out.loss_fn_outputs) == 4
    for mine, theirs in zip(per_datum, out.loss_fn_outputs):
        for name, values in mine.items():
            assert theirs[name].dtype == "float32"
            assert theirs[name].shape == [len(values)]
            assert theirs[name].tolist() == values.tolist()

    ints = deserialize_forward_backward_output(proto.encode_forward_backward_output([{"ids": np.array([1, 2])}], {}))
    assert ints.loss_fn_outputs[0]["ids"].dtype == "int64" and ints.loss_fn_outputs[0]["ids"].tolist() == [1, 2]
    empty = deserialize_forward_backward_output(proto.encode_forward_backward_output([], {"loss:sum": 0.0}))
    assert empty.loss_fn_outputs == [] and empty.metrics == {"loss:sum": 0.0}


def test_chunked_outputs_combine_in_the_sdk():
    """The SDK splits a large batch into chunks and joins their outputs; metrics by their suffix."""
    pytest.importorskip("tinker")
    from tinker.lib.chunked_fwdbwd_helpers import combine_fwd_bwd_output_results
    from tinker.proto.response_conv import deserialize_forward_backward_output

    first = proto.encode_forward_backward_output([{"logprobs": np.array([-1.0, -2.0])}], {"loss:sum": 3.0})
    second = proto.encode_forward_backward_output(
        [{"logprobs": np.array([-0.5])}, {"logprobs": np.array([-0.25])}], {"loss:sum": 0.75}
    )
    combined = combine_fwd_bwd_output_results([deserialize_forward_backward_output(b) for b in (first, second)])
    assert combined.metrics == {"loss:sum": 3.75}
    assert [o["logprobs"].tolist() for o in combined.loss_fn_outputs] == [[-1.0, -2.0], [-0.5], [-0.25]]


def test_outputs_the_sdk_could_not_combine_are_refused():
    with pytest.raises(ValueError, match="output fields"):
        proto.encode_forward_backward_output([{"logprobs": np.zeros(1)}, {"other": np.zeros(1)}], {})
    for name in ("loss", "loss:total", "a:b:sum"):
        with pytest.raises(ValueError, match="name:reduction"):
            proto.encode_forward_backward_output([], {name: 1.0})


def test_sample_response_decodes_in_the_sdk():
    pytest.importorskip("tinker")
    from tinker.proto.response_conv import deserialize_sample_response

    result = SampleResult(
        sequences=[
            SampledSequence(tokens=[7, 8, 2], logprobs=[-0.5, -0.25, -1.0], stop_reason="stop"),
            SampledSequence(tokens=[9, 150_000, 11, 12], logprobs=[-2.0, -0.125, -4.0, -0.0625], stop_reason="length"),
        ],
        prompt_logprobs=[None, -1.5, -0.75],
    )
    response = deserialize_sample_response(proto.encode_sample_response(result))
    assert [s.stop_reason for s in response.sequences] == ["stop", "length"]
    assert response.sequences[1].tokens == [9, 150_000, 11, 12]
    assert response.sequences[0].logprobs == [-0.5, -0.25, -1.0]
    assert response.prompt_logprobs == [None, -1.5, -0.75]
    assert math.isnan(response.prompt_logprobs_np[0])

    plain = deserialize_sample_response(
        proto.encode_sample_response(SampleResult([SampledSequence([1], [-0.5], "length")]))
    )
    assert plain.prompt_logprobs is None and plain.sequences[0].tokens == [1]


def test_sample_response_refuses_what_the_sdk_cannot_read():
    with pytest.raises(ValueError, match="stop_reason"):
        proto.encode_sample_response(SampleResult([SampledSequence([1], [-0.5], "eos")]))
    with pytest.raises(ValueError, match="log-probs"):
        proto.encode_sample_response(SampleResult([SampledSequence([1, 2], [-0.5], "stop")]))


def test_own_pool_loads_beside_the_sdk():
    """Both pools in one process: the SDK's messages still parse what this module writes."""
    pytest.importorskip("tinker")
    from tinker.proto import tinker_public_pb2

    body = proto.encode_sample_response(SampleResult([SampledSequence([3], [-1.0], "stop")], [None]))
    theirs = tinker_public_pb2.SampleResponse()
    theirs.ParseFromString(body)
    assert np.frombuffer(theirs.sequences[0].tokens, np.int32).tolist() == [3]
    assert proto.new_message("SampleResponse").DESCRIPTOR.full_name == "rlhf_cluster_tinker.SampleResponse"
