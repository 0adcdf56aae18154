"""A small reader of the ONNX protobuf wire format (initializers, nodes, Constant values), and the one edit the
conversion check needs (an extra float graph output), so that the ``onnx`` package is not needed."""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

_FLOAT, _INT32, _INT64, _FLOAT16, _DOUBLE = 1, 6, 7, 10, 11
_NP_TYPES = {_FLOAT: np.float32, _INT32: np.int32, _INT64: np.int64, _FLOAT16: np.float16, _DOUBLE: np.float64}


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, pos


def _fields(buf, start: int = 0, end: int | None = None):
    """Protobuf wire format: yields (field number, wire type, value); value is an int for varints and
    (start, end) offsets for length-delimited fields."""
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = (pos, pos + 8), pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = (pos, pos + length), pos + length
        elif wire == 5:
            value, pos = (pos, pos + 4), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")
        yield number, wire, value
    if pos != end:
        raise ValueError("truncated protobuf message")


def _str(buf, span) -> str:
    return bytes(buf[span[0]:span[1]]).decode()


def _tensor(buf, span) -> tuple[str, np.ndarray]:
    """TensorProto -> (name, array). Fields: dims=1, data_type=2, float_data=4, int32_data=5,
    int64_data=7, name=8, raw_data=9, double_data=10, data_location=14."""
    dims, dtype, name, raw = [], _FLOAT, "", None
    floats, ints = [], []
    for number, wire, value in _fields(buf, *span):
        if number == 1:
            if wire == 2:  # packed
                pos = value[0]
                while pos < value[1]:
                    dim, pos = _varint(buf, pos)
                    dims.append(dim)
            else:
                dims.append(value)
        elif number == 2:
            dtype = value
        elif number == 8:
            name = _str(buf, value)
        elif number == 9:
            raw = value
        elif number == 4:
            data = bytes(buf[value[0]:value[1]])
            floats.extend(struct.unpack(f"<{len(data) // 4}f", data))
        elif number in (5, 7):
            if wire == 2:
                pos = value[0]
                while pos < value[1]:
                    item, pos = _varint(buf, pos)
                    ints.append(item - (1 << 64) if item >= 1 << 63 else item)
            else:
                ints.append(value - (1 << 64) if value >= 1 << 63 else value)
        elif number == 14 and value == 1:
            raise ValueError(f"tensor {name!r} uses external data; not supported")
    if dtype not in _NP_TYPES:
        raise ValueError(f"tensor {name!r}: unsupported ONNX data type {dtype}")
    np_type = _NP_TYPES[dtype]
    if raw is not None:
        array = np.frombuffer(buf, dtype=np_type, count=(raw[1] - raw[0]) // np.dtype(np_type).itemsize,
                              offset=raw[0]).copy()
    elif floats:
        array = np.asarray(floats, dtype=np_type)
    else:
        array = np.asarray(ints, dtype=np_type)
    return name, array.reshape(dims)


@dataclass
class _Node:
    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    tensor_attr: np.ndarray | None = None  # a Constant node's value


@dataclass
class OnnxGraph:
    initializers: dict[str, np.ndarray]
    nodes: list[_Node]
    constants: dict[str, np.ndarray]  # output name of a Constant node -> value

    def value(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return self.initializers[name]
        return self.constants.get(name)


def read_onnx(data: bytes) -> OnnxGraph:
    """ModelProto.graph=7; GraphProto: node=1, initializer=5; NodeProto: input=1, output=2, name=3,
    op_type=4, attribute=5; AttributeProto: name=1, t=5."""
    buf = memoryview(data)
    graphs = [value for number, wire, value in _fields(buf) if number == 7 and wire == 2]
    if len(graphs) != 1:
        raise ValueError(f"expected one graph in the ONNX model, found {len(graphs)}")
    initializers, nodes, constants = {}, [], {}
    for number, wire, value in _fields(buf, *graphs[0]):
        if number == 5:
            name, array = _tensor(buf, value)
            initializers[name] = array
        elif number == 1:
            node = _Node("", "", [], [])
            for n2, _, v2 in _fields(buf, *value):
                if n2 == 1:
                    node.inputs.append(_str(buf, v2))
                elif n2 == 2:
                    node.outputs.append(_str(buf, v2))
                elif n2 == 3:
                    node.name = _str(buf, v2)
                elif n2 == 4:
                    node.op = _str(buf, v2)
                elif n2 == 5:
                    attr_name, attr_tensor = "", None
                    for n3, _, v3 in _fields(buf, *v2):
                        if n3 == 1:
                            attr_name = _str(buf, v3)
                        elif n3 == 5:
                            attr_tensor = _tensor(buf, v3)[1]
                    if attr_name == "value" and attr_tensor is not None:
                        node.tensor_attr = attr_tensor
            if node.op == "Constant" and node.tensor_attr is not None:
                constants[node.outputs[0]] = node.tensor_attr
            nodes.append(node)
    return OnnxGraph(initializers, nodes, constants)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def with_float_output(data: bytes, output_name: str) -> bytes:
    """The model with one more float32 graph output. Protobuf merges repeated occurrences of an
    embedded message field, so appending a second ModelProto.graph holding only the extra
    GraphProto.output (ValueInfoProto name=1, type=2 -> TypeProto.tensor_type=1 -> elem_type=1)
    yields the original graph plus that output."""
    tensor_type = _encode_varint(1 << 3 | 0) + _encode_varint(_FLOAT)
    value_info = _length_delimited(1, output_name.encode()) + _length_delimited(2, _length_delimited(1, tensor_type))
    return data + _length_delimited(7, _length_delimited(12, value_info))
