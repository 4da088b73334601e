"""The two protobuf payloads of the Tinker wire: the `forward_backward` request the SDK sends, and the
`ForwardBackwardOutput` and `SampleResponse` that `retrieve_future` answers with when the SDK asks
for `application/x-protobuf` (it refuses JSON for those two).

The messages are declared here, in code, in a private descriptor pool under the package
`rlhf_cluster_tinker`, so the server never imports the SDK and a test process that loads both never
sees two definitions of one name. Field numbers and types are those of the SDK's
`tinker_public.proto` (tinker 0.38.0, `tinker/proto/tinker_public_pb2.py`); only the messages the
server reads or writes are declared, and fields it does not know (provenance spans, say) are kept
by protobuf as unknown fields and ignored. Tensors travel as raw little-endian bytes: a request's
`Tensor` is one dense buffer plus its shape; an output's `BatchedTensor` is all datums' values back
to back with their byte offsets (int64, one more than the datums), as the SDK's `response_conv`
slices them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from rlhf_cluster.tinker.records import Datum, SampleResult

PACKAGE = "rlhf_cluster_tinker"

_F = descriptor_pb2.FieldDescriptorProto
# Field kinds used below: (protobuf type, element type name or None).
_KINDS: dict[str, Any] = {
    "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
    "bool": _F.TYPE_BOOL,
    "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64,
    "uint32": _F.TYPE_UINT32,
    "double": _F.TYPE_DOUBLE,
}

# message name -> [(field, number, kind, flags)]; kind is a scalar kind above, a message name, an enum
# name (`enum:DType`) or a map (`map:string:double`); flags: "repeated", "optional" (proto3 optional)
# or "oneof:NAME". Numbers as in tinker_public.proto.
_MESSAGES: dict[str, list[tuple[str, int, str, str]]] = {
    "EncodedTextChunk": [("tokens", 1, "bytes", "")],
    "ImageChunk": [("data", 1, "bytes", ""), ("format", 2, "string", "")],
    "DmelChunk": [("dmel", 1, "bytes", "")],
    "Chunk": [
        ("encoded_text", 1, "EncodedTextChunk", "oneof:chunk"),
        ("image", 2, "ImageChunk", "oneof:chunk"),
        ("dmel", 3, "DmelChunk", "oneof:chunk"),
    ],
    "SparseCsr": [("values", 1, "bytes", ""), ("crow_indices", 2, "bytes", ""), ("col_indices", 3, "bytes", "")],
    "Tensor": [
        ("dense", 1, "bytes", "oneof:encoding"),
        ("sparse_csr", 2, "SparseCsr", "oneof:encoding"),
        ("dtype", 3, "enum:DType", ""),
        ("shape", 4, "int64", "repeated"),
    ],
    "Datum": [("model_input", 1, "Chunk", "repeated"), ("loss_fn_inputs", 2, "map:string:Tensor", "")],
    "LossConfigValue": [("number", 1, "double", "oneof:value"), ("text", 2, "string", "oneof:value")],
    "ForwardBackwardRequest": [
        ("model_id", 1, "string", ""),
        ("seq_id", 2, "int32", ""),
        ("data", 3, "Datum", "repeated"),
        ("loss_fn", 4, "string", ""),
        ("loss_fn_config", 5, "map:string:double", ""),
        ("forward_only", 6, "bool", ""),
        ("loss_fn_config_v2", 7, "map:string:LossConfigValue", ""),
    ],
    "BatchedTensor": [
        ("data", 1, "bytes", ""),
        ("offsets", 2, "bytes", ""),
        ("dtype", 3, "enum:DType", ""),
        ("trailing_shape", 4, "int64", "repeated"),
    ],
    "ArrayRecord": [
        ("type_tag", 1, "string", ""),
        ("fields", 2, "map:string:BatchedTensor", ""),
        ("num_datums", 3, "int64", ""),
    ],
    "ForwardBackwardOutput": [
        ("loss_fn_output_type", 1, "string", ""),
        ("loss_fn_outputs", 2, "ArrayRecord", "repeated"),
        ("metrics", 3, "map:string:double", ""),
    ],
    "SampledSequence": [
        ("stop_reason", 1, "enum:StopReason", ""),
        ("tokens", 2, "bytes", ""),
        ("logprobs", 3, "bytes", "optional"),
    ],
    "SampleResponse": [
        ("sequences", 1, "SampledSequence", "repeated"),
        ("prompt_logprobs", 2, "bytes", "optional"),
        ("prompt_cache_hit_tokens", 4, "int32", ""),
    ],
}
_ENUMS = {
    "StopReason": [("STOP_REASON_STOP", 0), ("STOP_REASON_LENGTH", 1)],
    "DType": [
        ("DTYPE_UNSPECIFIED", 0),
        ("DTYPE_FLOAT32", 1),
        ("DTYPE_INT64", 2),
        ("DTYPE_INT32", 3),
        ("DTYPE_BFLOAT16", 4),
    ],
}
DTYPE_FLOAT32, DTYPE_INT64, DTYPE_INT32, DTYPE_BFLOAT16 = 1, 2, 3, 4
STOP_REASONS = {"stop": 0, "length": 1}
# The SDK combines chunked forward_backward results by the suffix of each metric's name
# (`chunked_fwdbwd_helpers._metrics_reduction`, which fails on a name without exactly one ':').
METRIC_REDUCTIONS = ("mean", "sum", "min", "max", "slack", "hash2", "unique")


class WireError(Exception):
    """A request the server cannot take: `field` names where (`data[2].loss_fn_inputs.weights`,
    `sampling_params.stop`), the message says what was expected. The routes answer it with 400."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _set_kind(fd: Any, kind: str) -> None:
    if kind in _KINDS:
        fd.type = _KINDS[kind]
    elif kind.startswith("enum:"):
        fd.type, fd.type_name = _F.TYPE_ENUM, f".{PACKAGE}.{kind[5:]}"
    else:
        fd.type, fd.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{kind}"


def _add_message(file: Any, name: str, fields: list[tuple[str, int, str, str]]) -> None:
    msg = file.message_type.add(name=name)
    oneofs: dict[str, int] = {}
    for fname, number, kind, flags in fields:
        fd = msg.field.add(name=fname, number=number, label=_F.LABEL_OPTIONAL)
        if kind.startswith("map:"):
            _, key_kind, value_kind = kind.split(":", 2)
            entry = "".join(part.capitalize() for part in fname.split("_")) + "Entry"
            nested = msg.nested_type.add(name=entry)
            nested.options.map_entry = True
            _set_kind(nested.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL), key_kind)
            _set_kind(nested.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL), value_kind)
            fd.label, fd.type, fd.type_name = _F.LABEL_REPEATED, _F.TYPE_MESSAGE, f".{PACKAGE}.{name}.{entry}"
            continue
        _set_kind(fd, kind)
        if flags == "repeated":
            fd.label = _F.LABEL_REPEATED
        group = f"_{fname}" if flags == "optional" else flags[6:] if flags.startswith("oneof:") else None
        if group is not None:
            if group not in oneofs:
                oneofs[group] = len(msg.oneof_decl)
                msg.oneof_decl.add(name=group)
            fd.oneof_index = oneofs[group]
            fd.proto3_optional = flags == "optional"


def _build_pool() -> dict[str, type[Message]]:
    file = descriptor_pb2.FileDescriptorProto(name=f"{PACKAGE}/tinker_wire.proto", package=PACKAGE, syntax="proto3")
    for name, values in _ENUMS.items():
        enum = file.enum_type.add(name=name)
        for vname, number in values:
            enum.value.add(name=vname, number=number)
    for name, fields in _MESSAGES.items():
        _add_message(file, name, fields)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}")) for name in _MESSAGES
    }


_CLASSES = _build_pool()


def new_message(name: str) -> Any:
    """An empty message of this module's pool (`"ForwardBackwardRequest"`, `"SampleResponse"`, ...)."""
    return _CLASSES[name]()


@dataclass(frozen=True)
class ForwardBackwardCall:
    """A decoded `forward_backward` request. `loss_fn_config` merges the SDK's two maps (the v2 map,
    which also carries strings, wins where both name a key); `forward_only` asks for a forward
    without gradients (`TrainingClient.forward`)."""

    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float | str] = field(default_factory=dict)
    forward_only: bool = False
    datums: list[Datum] = field(default_factory=list)


def decode_forward_backward(body: bytes) -> ForwardBackwardCall:
    """The SDK's protobuf `ForwardBackwardRequest` (uncompressed) as a `ForwardBackwardCall`."""
    msg = new_message("ForwardBackwardRequest")
    try:
        msg.ParseFromString(bytes(body))
    except (DecodeError, ValueError, TypeError) as e:
        raise WireError("body", f"expected a protobuf ForwardBackwardRequest ({e})") from e
    if not msg.model_id:
        raise WireError("model_id", "expected a model id")
    if not msg.loss_fn:
        raise WireError("loss_fn", "expected a loss function name")
    config: dict[str, float | str] = {key: float(value) for key, value in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        kind = value.WhichOneof("value")
        if kind is None:
            raise WireError(f"loss_fn_config_v2.{key}", "expected a number or a text value")
        config[key] = float(value.number) if kind == "number" else str(value.text)
    datums = [_decode_datum(d, f"data[{i}]") for i, d in enumerate(msg.data)]
    return ForwardBackwardCall(
        model_id=msg.model_id,
        seq_id=int(msg.seq_id),
        loss_fn=msg.loss_fn,
        loss_fn_config=config,
        forward_only=bool(msg.forward_only),
        datums=datums,
    )


def _frombuffer(raw: bytes, dtype: Any, where: str) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    if len(raw) % itemsize:
        raise WireError(where, f"expected a whole number of {np.dtype(dtype).name} values, got {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype)


def _decode_datum(msg: Any, where: str) -> Datum:
    parts = []
    for j, chunk in enumerate(msg.model_input):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise WireError(
                f"{where}.model_input[{j}]",
                f"only encoded_text chunks are served, got {kind or 'an empty or unknown chunk'}",
            )
        parts.append(_frombuffer(chunk.encoded_text.tokens, "<i4", f"{where}.model_input[{j}].encoded_text.tokens"))
    tokens = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    inputs = {
        name: _decode_input(t, name, len(tokens), f"{where}.loss_fn_inputs.{name}")
        for name, t in msg.loss_fn_inputs.items()
    }
    return Datum(tokens=tokens, inputs=inputs)


def _decode_input(t: Any, name: str, n: int, where: str) -> np.ndarray:
    """One loss input: a dense 1-D tensor of n values; `target_tokens` as int64, the rest float32."""
    encoding = t.WhichOneof("encoding")
    if encoding != "dense":
        got = "a sparse CSR tensor" if encoding == "sparse_csr" else "no values"
        raise WireError(where, f"expected a dense 1-D tensor of {n} values (one per input token), got {got}")
    if t.dtype in (DTYPE_INT64, DTYPE_INT32):
        values = _frombuffer(t.dense, "<i8" if t.dtype == DTYPE_INT64 else "<i4", where).astype(np.int64)
    elif t.dtype == DTYPE_FLOAT32:
        values = _frombuffer(t.dense, "<f4", where).astype(np.float32)
    elif t.dtype == DTYPE_BFLOAT16:
        values = (_frombuffer(t.dense, "<u2", where).astype(np.uint32) << 16).view(np.float32)
    else:
        raise WireError(where, f"expected dtype int64 or float32, got enum value {t.dtype}")
    shape = list(t.shape)
    if shape and int(np.prod(shape)) != values.size:
        raise WireError(where, f"shape {shape} does not match its {values.size} values")
    if len(shape) > 1:
        raise WireError(where, f"expected a 1-D tensor of {n} values, got shape {shape} (2-D forms are not served)")
    if name == "target_tokens":
        if values.dtype != np.int64:
            raise WireError(where, "expected int64 token ids, got float32")
    else:
        values = values.astype(np.float32)
    if values.size != n:
        raise WireError(where, f"expected {n} values (one per input token), got {values.size}")
    return values


def _batched(arrays: list[np.ndarray], name: str) -> Any:
    """One output field of every datum as a `BatchedTensor`: int64 or float32 values back to back,
    their byte offsets, and the trailing shape they share (empty for 1-D fields)."""
    floating = any(np.issubdtype(a.dtype, np.floating) for a in arrays)
    dtype, code = (np.dtype("<f4"), DTYPE_FLOAT32) if floating else (np.dtype("<i8"), DTYPE_INT64)
    trailing = {tuple(a.shape[1:]) for a in arrays}
    if len(trailing) > 1:
        raise ValueError(f"output field {name!r}: datums differ in trailing shape {sorted(trailing)}")
    cast = [np.ascontiguousarray(a, dtype=dtype) for a in arrays]
    offsets = np.zeros(len(cast) + 1, dtype="<i8")
    offsets[1:] = np.cumsum([a.nbytes for a in cast])
    bt = new_message("BatchedTensor")
    bt.data = b"".join(a.tobytes() for a in cast)
    bt.offsets = offsets.tobytes()
    bt.dtype = code
    bt.trailing_shape.extend(trailing.pop() if trailing else ())
    return bt


def encode_forward_backward_output(per_datum: list[dict[str, np.ndarray]], metrics: dict[str, float]) -> bytes:
    """A `ForwardBackwardOutput`: one ArrayRecord holding each datum's outputs (`logprobs`,
    `elementwise_loss`, ...; every datum has the same names) and the metrics, whose names carry
    their reduction (`loss:sum`). The SDK decodes it to `loss_fn_outputs[i][name]` TensorData."""
    msg = new_message("ForwardBackwardOutput")
    msg.loss_fn_output_type = "ArrayRecord"
    for key, value in metrics.items():
        if key.count(":") != 1 or key.split(":")[1] not in METRIC_REDUCTIONS:
            raise ValueError(f"metric {key!r}: expected 'name:reduction', reduction one of {METRIC_REDUCTIONS}")
        msg.metrics[key] = float(value)
    if not per_datum:
        return bytes(msg.SerializeToString())
    names = list(per_datum[0])
    for i, outputs in enumerate(per_datum):
        if sorted(outputs) != sorted(names):
            raise ValueError(f"datum {i} has output fields {sorted(outputs)}, datum 0 has {sorted(names)}")
    record = msg.loss_fn_outputs.add()
    record.type_tag = "ArrayRecord"
    record.num_datums = len(per_datum)
    for name in names:
        record.fields[name].CopyFrom(_batched([np.asarray(d[name]) for d in per_datum], name))
    return bytes(msg.SerializeToString())


def encode_sample_response(result: SampleResult) -> bytes:
    """A `SampleResponse`: per sequence its int32 tokens, float32 log-probs and stop reason; the prompt's
    log-probs (float32, NaN where there is none, as the first) when they were asked for."""
    msg = new_message("SampleResponse")
    for seq in result.sequences:
        if seq.stop_reason not in STOP_REASONS:
            raise ValueError(f"stop_reason {seq.stop_reason!r}: expected one of {sorted(STOP_REASONS)}")
        if len(seq.logprobs) != len(seq.tokens):
            raise ValueError(f"a sequence of {len(seq.tokens)} tokens has {len(seq.logprobs)} log-probs")
        out = msg.sequences.add()
        out.stop_reason = STOP_REASONS[seq.stop_reason]
        out.tokens = np.asarray(seq.tokens, dtype="<i4").tobytes()
        out.logprobs = np.asarray(seq.logprobs, dtype="<f4").tobytes()
    if result.prompt_logprobs is not None:
        values = [np.nan if v is None else float(v) for v in result.prompt_logprobs]
        msg.prompt_logprobs = np.asarray(values, dtype="<f4").tobytes()
    return bytes(msg.SerializeToString())
