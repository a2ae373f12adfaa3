"""Pure parts of the SQS adapter: body encoding, the 10-attribute rule, the FIFO group gate."""

from __future__ import annotations

import json

from stalk.collectors.sqs.fifo import GroupGate
from stalk.collectors.sqs.wire import (
    ATTR_PACKED,
    MAX_ATTRIBUTES,
    decode_body,
    encode_body,
    pack,
    string_attributes,
    unpack,
)
from stalk.message import Message


def test_text_bodies_travel_as_is_and_others_as_base64() -> None:
    assert encode_body("plain é 日本".encode()) == ("plain é 日本", False)
    for body in (b"\xff\xfe", b"nul\x00inside", bytes(range(256))):
        text, encoded = encode_body(body)
        assert encoded and decode_body(text, "base64") == body
    assert decode_body("not base64!", "base64") == b"not base64!"  # someone else's marker


def test_pack_keeps_everything_within_ten_and_unpack_restores_it() -> None:
    own = {f"own{i}": {"DataType": "String", "StringValue": str(i)} for i in range(5)}
    own["bin"] = {"DataType": "Binary", "BinaryValue": b"\x00\xff"}
    stalk = string_attributes({f"stalk-{i}": "x" for i in range(8)})
    packed = pack(own, stalk)
    assert len(packed) <= MAX_ATTRIBUTES and set(stalk) <= set(packed)
    assert set(json.loads(packed[ATTR_PACKED]["StringValue"])) == set(own)
    assert unpack(packed) == {**stalk, **own}
    assert pack(dict(list(own.items())[:2]), stalk) == {**stalk, **dict(list(own.items())[:2])}


def test_pack_folds_stalk_attributes_beyond_nine_too() -> None:
    stalk = string_attributes({f"stalk-{i:02}": "x" for i in range(12)})
    packed = pack({"own": {"DataType": "String", "StringValue": "v"}}, stalk)
    assert len(packed) == MAX_ATTRIBUTES
    assert unpack(packed).keys() == {*stalk, "own"}


def test_unpack_leaves_a_foreign_attribute_of_the_same_name_alone() -> None:
    foreign = {ATTR_PACKED: {"DataType": "String", "StringValue": "not json"}}
    assert unpack(foreign) == foreign


def test_string_attributes_drop_empty_values_and_replace_refused_characters() -> None:
    got = string_attributes({"a": "", "b": "ok\x00"})
    assert got == {"b": {"DataType": "String", "StringValue": "ok\ufffd"}}


def test_group_gate_holds_group_mates_until_the_head_is_settled() -> None:
    groups = {"a1": "A", "a2": "A", "a3": "A", "b1": "B", "x": None}
    gate = GroupGate(lambda m: groups[m.id], lease_s=60)
    msgs = {k: Message(k, b"") for k in groups}
    out = gate.admit([msgs["a1"], msgs["a2"], msgs["b1"], msgs["a3"], msgs["x"]])
    assert [m.id for m in out] == ["a1", "b1", "x"] and gate.held_count == 2
    assert gate.take(10) == []
    assert [m.id for m in gate.touch(msgs["a1"])] == ["a2", "a3"]
    gate.done(msgs["a1"])
    assert [m.id for m in gate.take(10)] == ["a2"]
    assert [m.id for m in gate.abandon(msgs["a2"])] == ["a3"]  # retried: a3 goes back behind it
    assert gate.held_count == 0 and gate.drain() == []


def test_group_gate_forgets_a_head_whose_lease_lapsed() -> None:
    gate = GroupGate(lambda m: "G", lease_s=0.0)
    first, second = Message("1", b""), Message("2", b"")
    assert gate.admit([first, second]) == [first]
    assert gate.take(10) == []  # both back with SQS; nothing blocks the group
    assert gate.held_count == 0
    assert gate.admit([Message("3", b"")])
