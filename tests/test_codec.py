"""The codec: exact round trips, refusals that name the type, rebuilt exceptions, and corrupt payloads.

Payloads built by hand use the byte values of the wire format documented in mpflight/_codec.py, so that a
change of format fails here rather than between two versions in production.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import enum
import errno
import math
import os
import random
import sys
import traceback
import tracemalloc
import uuid
import zoneinfo
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import msgpack
import pytest

from mpflight import _codec
from mpflight._codec import Codec, pack_abort, pack_error, pack_not_carried, pack_value, unpack
from mpflight._errors import (
    AbortError,
    CorruptPayload,
    DeadlockError,
    MPFlightError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
)

KEY = "the-key"
PID = 4242
MIB = 1024 * 1024


def roundtrip(value: object, codec: Codec | None = None) -> object:
    return unpack(pack_value(value, codec), codec, key=KEY, owner_pid=PID)


def assert_same(a: object, b: object) -> None:
    """Assert that ``b`` equals ``a`` with the same type at every level (and order, sign, fold, tz).

    A loop, not recursion: values nest deeper than Python's recursion limit.
    """
    todo: list[tuple[object, object, str]] = [(a, b, "value")]
    while todo:
        a, b, path = todo.pop()
        assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
        if isinstance(a, float):
            assert isinstance(b, float)
            if math.isnan(a):
                assert math.isnan(b), f"{path}: {b!r} is not nan"
            else:
                assert a == b and math.copysign(1, a) == math.copysign(1, b), f"{path}: {a!r} != {b!r}"
        elif isinstance(a, Decimal):
            assert isinstance(b, Decimal)
            assert a.compare_total(b) == 0 and str(a) == str(b), f"{path}: {a!r} != {b!r}"
        elif isinstance(a, list | tuple):
            assert isinstance(b, list | tuple)
            assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
            todo.extend((x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
        elif isinstance(a, dict):
            assert isinstance(b, dict)
            assert len(a) == len(b), f"{path}: {len(a)} keys != {len(b)}"
            pairs = zip(a.items(), b.items(), strict=True)  # msgpack keeps the order
            for i, ((ka, va), (kb, vb)) in enumerate(pairs):
                todo.append((ka, kb, f"{path} key #{i}"))
                todo.append((va, vb, f"{path} value #{i}"))
        elif isinstance(a, set | frozenset):
            assert isinstance(b, set | frozenset)
            assert len(a) == len(b), f"{path}: {len(a)} items != {len(b)}"
            twins = {x: x for x in b}
            for x in a:
                assert x in twins, f"{path}: an item is missing"
                todo.append((x, twins[x], f"{path} item"))
        elif isinstance(a, datetime | date | time | timedelta | uuid.UUID):
            # repr shows fold, the tzinfo's class, a timezone's name and a ZoneInfo's key.
            assert a == b and repr(a) == repr(b), f"{path}: {a!r} != {b!r}"
        else:
            assert a == b, f"{path}: {a!r:.80} != {b!r:.80}"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1, True),
        (1, 1.0),
        ((1,), [1]),
        ([(1,)], [[1]]),
        ({1: (1,)}, {1: [1]}),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        (0.0, -0.0),
        (float("nan"), 1.0),
        (Decimal("-0"), Decimal("0")),
        (Decimal("1.0"), Decimal("1.00")),
        (frozenset({(1,)}), frozenset({(1,)}) | {1}),
        (datetime(2021, 11, 7, 1, 30, fold=1), datetime(2021, 11, 7, 1, 30)),
        (datetime(2020, 1, 1, tzinfo=timezone(timedelta(0), "Z")), datetime(2020, 1, 1, tzinfo=UTC)),
    ],
)
def test_assert_same_sees_the_difference(a: object, b: object) -> None:
    """The round-trip checks below can fail: the checker tells these apart."""
    with pytest.raises(AssertionError):
        assert_same(a, b)


NEW_YORK = ZoneInfo("America/New_York")

VALUES: dict[str, object] = {
    "none": None,
    "true": True,
    "false": False,
    "zero": 0,
    "int64 min": -(2**63),
    "uint64 max": 2**64 - 1,
    "2**64": 2**64,
    "int64 min - 1": -(2**63) - 1,
    "huge int": 7**1000,
    "huge negative int": -(2**4096),
    "float": 1.5,
    "negative zero": -0.0,
    "inf": math.inf,
    "-inf": -math.inf,
    "nan": math.nan,
    "str": "héllo ✓ \x00",
    "empty str": "",
    "bytes": b"\x00\xff" * 10,
    "empty bytes": b"",
    "list": [1, "a", None],
    "empty list": [],
    "tuple": (1, "a", None),
    "empty tuple": (),
    "tuple of tuples": ((), ((),)),
    "set": {1, "a", (2, 3), None},
    "empty set": set(),
    "frozenset": frozenset({1, frozenset({2, (3,)})}),
    "empty frozenset": frozenset(),
    "dict": {"a": 1, "b": [2]},
    "empty dict": {},
    "dict keys": {
        (1, 2): "tuple",
        frozenset({1}): "frozenset",
        3: "int",
        None: "none",
        2.5: "float",
        b"k": "bytes",
        "s": "str",
        True: "bool",
        -(2**70): "bigint",
        (): "empty tuple",
        ((1, frozenset()), "x"): "nested",
    },
    "more dict keys": {
        Decimal("1.25"): 1,
        uuid.UUID(int=5): 2,
        date(2020, 1, 1): 3,
        datetime(2020, 1, 1, 1): 4,
        timedelta(1): 5,
        time(1): 6,
    },
    "datetime": datetime(2024, 2, 29, 23, 59, 58, 999999),
    "datetime min": datetime.min,
    "datetime max": datetime.max,
    "datetime utc": datetime(2020, 1, 1, tzinfo=UTC),
    "datetime -05:30": datetime(2020, 1, 1, tzinfo=timezone(-timedelta(hours=5, minutes=30))),
    "datetime named offset": datetime(2020, 1, 1, tzinfo=timezone(timedelta(hours=5), "Somewhere")),
    "datetime offset in us": datetime(2020, 1, 1, tzinfo=timezone(timedelta(hours=23, microseconds=7), "x")),
    "datetime zoneinfo": datetime(2020, 6, 1, 12, tzinfo=ZoneInfo("Europe/Paris")),
    "datetime zoneinfo fold 0": datetime(2021, 11, 7, 1, 30, tzinfo=NEW_YORK),
    "datetime zoneinfo fold 1": datetime(2021, 11, 7, 1, 30, fold=1, tzinfo=NEW_YORK),
    "datetime naive fold 1": datetime(2021, 11, 7, 1, 30, fold=1),
    "date": date(2024, 2, 29),
    "date min": date.min,
    "date max": date.max,
    "time": time(1, 2, 3, 4),
    "time max": time.max,
    "time fold": time(1, 30, fold=1),
    "time tz": time(1, 2, tzinfo=timezone(timedelta(hours=-3), "BRT")),
    "time zoneinfo": time(1, 2, tzinfo=ZoneInfo("UTC"), fold=1),
    "timedelta": timedelta(days=-5, seconds=3, microseconds=4),
    "timedelta min": timedelta.min,
    "timedelta max": timedelta.max,
    "decimal": Decimal("3.14"),
    "decimal trailing zeros": Decimal("1.100"),
    "decimal -0": Decimal("-0"),
    "decimal nan": Decimal("NaN"),
    "decimal -nan payload": Decimal("-NaN123"),
    "decimal snan": Decimal("sNaN"),
    "decimal inf": Decimal("Infinity"),
    "decimal -inf": Decimal("-Infinity"),
    "decimal huge exponent": Decimal("1E+999999999999999999"),
    "decimal tiny exponent": Decimal("-1E-999999999999999999"),
    "decimal many digits": Decimal("9" * 2000 + "." + "1" * 2000),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "uuid zero": uuid.UUID(int=0),
    "uuid max": uuid.UUID(int=2**128 - 1),
    "mixture": {
        "rows": [(1, "a", 2.5, None, Decimal("1.5")), (2, "b", -0.0, b"", uuid.UUID(int=1))],
        "when": {date(2020, 1, 1): [datetime(2020, 1, 1, tzinfo=NEW_YORK), timedelta(seconds=1)]},
        (1, (2, (3, frozenset({(4, 5)})))): [{frozenset({"x"}): ({1, 2}, [set()])}],
        "big": [2**100, -(2**100), [2**65]],
    },
}


@pytest.mark.parametrize("value", VALUES.values(), ids=VALUES.keys())
def test_roundtrip_keeps_value_and_exact_types(value: object) -> None:
    assert_same(value, roundtrip(value))


@pytest.mark.parametrize("value", VALUES.values(), ids=VALUES.keys())
def test_roundtrip_from_a_memoryview(value: object) -> None:
    """Waiters read large results through a view of shared memory."""
    payload = bytearray(pack_value(value, None))
    with memoryview(payload) as view:
        assert_same(value, unpack(view, None, key=KEY, owner_pid=PID))


@pytest.mark.parametrize("value", VALUES.values(), ids=VALUES.keys())
def test_roundtrip_inside_containers(value: object) -> None:
    wrapped = [value, (value,), {"k": value}, {"k": [({"x": value},)]}]
    assert_same(wrapped, roundtrip(wrapped))


def nested(kind: str, depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        if kind == "list":
            value = [value]
        elif kind == "tuple":
            value = (value,)
        elif kind == "dict":
            value = {"k": value}
        elif kind == "frozenset":
            value = frozenset({value, 1})
        else:
            value = [(value,), {"k": frozenset({1})}] if kind == "mixed" else {(1,): value}
    return value


@pytest.mark.parametrize("kind", ["list", "tuple", "dict", "frozenset", "mixed", "tuple keys"])
def test_deep_nesting_roundtrips(kind: str) -> None:
    value = nested(kind, 500)
    assert_same(value, roundtrip(value))


@pytest.mark.parametrize("kind", ["list", "tuple", "dict", "frozenset"])
def test_too_deep_is_refused_not_crashed(kind: str) -> None:
    with pytest.raises(SerializationError, match="cannot carry the value"):
        pack_value(nested(kind, 5000), None)


@pytest.mark.parametrize(
    "innermost", [0, [], (), {}], ids=["leaf", "empty list", "empty tuple", "empty dict"]
)
@pytest.mark.parametrize("kind", ["list", "tuple", "dict"])
def test_everything_that_packs_unpacks_at_the_depth_limit(kind: str, innermost: object) -> None:
    """msgpack packs one level deeper than it unpacks; the payload's header closes that gap."""
    packed = 0
    for depth in range(1010, 1035):
        value: object = innermost
        for _ in range(depth):
            value = [value] if kind == "list" else (value,) if kind == "tuple" else {"k": value}
        try:
            payload = pack_value(value, None)
        except SerializationError:
            continue
        packed += 1
        assert_same(value, unpack(payload, None, key=KEY, owner_pid=PID))
    assert 5 < packed < 25, "the depth limit lies inside the range tried"


class MyStr(str):
    pass


class MyInt(int):
    pass


class MyFloat(float):
    pass


class MyBytes(bytes):
    pass


class MyList(list[Any]):
    pass


class MyDict(dict[Any, Any]):
    pass


class MySet(set[Any]):
    pass


class MyFrozenset(frozenset[Any]):
    pass


class MyDatetime(datetime):
    pass


class MyDate(date):
    pass


class MyDecimal(Decimal):
    pass


class MyUUID(uuid.UUID):
    pass


class Color(enum.IntEnum):
    RED = 1


class Shape(enum.Enum):
    SQUARE = "square"


class Pair(NamedTuple):
    x: int
    y: int


def qualified(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


NOT_CARRIED: dict[str, tuple[object, type]] = {
    "OrderedDict": (collections.OrderedDict(a=1), collections.OrderedDict),
    "defaultdict": (collections.defaultdict(int), collections.defaultdict),
    "namedtuple": (Pair(1, 2), Pair),
    "IntEnum": (Color.RED, Color),
    "Enum": (Shape.SQUARE, Shape),
    "str subclass": (MyStr("x"), MyStr),
    "int subclass": (MyInt(1), MyInt),
    "float subclass": (MyFloat(1.0), MyFloat),
    "bytes subclass": (MyBytes(b"x"), MyBytes),
    "list subclass": (MyList([1]), MyList),
    "dict subclass": (MyDict(a=1), MyDict),
    "set subclass": (MySet({1}), MySet),
    "frozenset subclass": (MyFrozenset({1}), MyFrozenset),
    "datetime subclass": (MyDatetime(2020, 1, 1), MyDatetime),
    "date subclass": (MyDate(2020, 1, 1), MyDate),
    "Decimal subclass": (MyDecimal("1"), MyDecimal),
    "UUID subclass": (MyUUID(int=1), MyUUID),
    "object": (object(), object),
    "function": (len, type(len)),
    "complex": (1j, complex),
    "tzinfo alone": (UTC, timezone),
}


@pytest.mark.parametrize(("value", "cls"), NOT_CARRIED.values(), ids=NOT_CARRIED.keys())
@pytest.mark.parametrize(
    "where",
    [
        lambda v: v,
        lambda v: [1, v],
        lambda v: (v,),
        lambda v: {"k": v},
        lambda v: {"k": [{"j": (v,)}]},
        lambda v: {v: 1} if _hashable(v) else {1: v},
        lambda v: {v} if _hashable(v) else [v],
    ],
    ids=["top", "in list", "in tuple", "dict value", "deep", "dict key", "in set"],
)
def test_subclasses_and_unknown_types_are_refused_by_name(
    value: object, cls: type, where: Callable[[object], object]
) -> None:
    with pytest.raises(SerializationError) as caught:
        pack_value(where(value), None)
    assert str(caught.value) == f"cannot carry a value of type {qualified(cls)!r}"


def _hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def test_the_refusal_names_module_and_qualname() -> None:
    with pytest.raises(
        SerializationError, match=r"^cannot carry a value of type 'collections\.OrderedDict'$"
    ):
        pack_value(collections.OrderedDict(), None)
    with pytest.raises(SerializationError, match=rf"^cannot carry a value of type '{__name__}\.Pair'$"):
        pack_value([Pair(1, 2)], None)


@pytest.mark.parametrize(
    "value", [bytearray(b"x"), memoryview(b"x"), msgpack.ExtType(1, b""), msgpack.Timestamp(1)]
)
def test_what_msgpack_writes_itself_is_refused_as_the_whole_value(value: object) -> None:
    with pytest.raises(SerializationError, match=f"'{qualified(type(value))}'"):
        pack_value(value, None)


def test_bytearray_and_memoryview_inside_a_container_arrive_as_bytes() -> None:
    """The documented gap: msgpack writes them before mpflight is asked (module docstring)."""
    assert_same([b"a", {"k": b"b"}], roundtrip([bytearray(b"a"), {"k": memoryview(b"b")}]))


class OtherTz(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta:
        return timedelta(hours=1)

    def dst(self, dt: datetime | None) -> timedelta:
        return timedelta(0)

    def tzname(self, dt: datetime | None) -> str:
        return "other"


class MyZoneInfo(ZoneInfo):
    pass


def test_a_datetime_with_another_tzinfo_class_is_refused() -> None:
    with pytest.raises(SerializationError, match=r"tzinfo of type '.*OtherTz'"):
        pack_value(datetime(2020, 1, 1, tzinfo=OtherTz()), None)
    with pytest.raises(SerializationError, match=r"tzinfo of type '.*OtherTz'"):
        pack_value([time(1, tzinfo=OtherTz())], None)
    with pytest.raises(SerializationError, match=r"tzinfo of type '.*MyZoneInfo'"):
        pack_value(datetime(2020, 1, 1, tzinfo=MyZoneInfo("UTC")), None)


def test_a_zoneinfo_without_a_key_is_refused() -> None:
    path = next(
        p for p in (os.path.join(d, "America/New_York") for d in zoneinfo.TZPATH) if os.path.exists(p)
    )
    with open(path, "rb") as f:
        zone = ZoneInfo.from_file(f)
    with pytest.raises(SerializationError, match="without an IANA key"):
        pack_value(datetime(2020, 1, 1, tzinfo=zone), None)


def test_str_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(SerializationError, match="surrogate"):
        pack_value({"k": "\udc80"}, None)


def test_wire_format() -> None:
    """Pins the documented bytes: [tag, body], markers after the parts, ext codes."""
    assert pack_value(5, None) == b"\x92\x00\x05"
    assert pack_value((1,), None) == b"\x92\x00\x92\x01\xc7\x00\x00"
    assert pack_value({2}, None) == b"\x92\x00\x92\x02\xc7\x00\x01"
    assert pack_value(frozenset(), None) == b"\x92\x00\x91\xc7\x00\x02"
    assert pack_value(2**64, None) == b"\x92\x00\xc7\x09\x03\x01" + bytes(8)
    assert pack_value(date(2020, 1, 2), None) == b"\x92\x00\xd6\x05\x07\xe4\x01\x02"
    assert pack_value(uuid.UUID(int=1), None) == b"\x92\x00\xd8\x09" + bytes(15) + b"\x01"
    assert pack_value(b"ab", None) == b"\x92\x00\xc6\x00\x00\x00\x02ab"
    assert pack_abort("why") == b"\x92\x02\xa3why"
    assert pack_not_carried("no") == b"\x92\x03\xa2no"
    assert pack_error(ValueError("x"), None).startswith(
        b"\x92\x01\x97\xa8builtins\xaaValueError\x91\xa1x\xa1x"
    )


# --- registered types ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


class SubPoint(Point):
    pass


@dataclasses.dataclass
class Node:
    name: str
    children: list[Node]


def make_codec() -> Codec:
    codec = Codec()
    codec.register(Point, 0, lambda p: (p.x, p.y), lambda t: Point(*t))
    codec.register(Node, 63, lambda n: [n.name, n.children], lambda v: Node(v[0], v[1]))
    codec.register(Pair, 7, tuple, lambda t: Pair(*t))
    codec.register(Color, 8, int, Color)
    return codec


def tree(depth: int) -> Node:
    node = Node("leaf", [])
    for i in range(depth):
        node = Node(f"n{i}", [node, Node("x", [])])
    return node


REGISTERED: dict[str, object] = {
    "point": Point(1, 2),
    "points in a list": [Point(1, 2), Point(3, 4)],
    "point as a key": {Point(1, 2): Point(3, 4)},
    "point in a set": {Point(1, 2), (Point(3, 4),)},
    "point in a tuple": (Point(1, 2),),
    "tree": tree(100),
    "namedtuple": Pair(1, 2),
    "IntEnum": [Color.RED, {Color.RED: Pair(3, 4)}],
    "a registered type in another's encoding": Node("n", [Node("p", []), Point(1, 2)]),  # type: ignore[list-item]
}


@pytest.mark.parametrize("value", REGISTERED.values(), ids=REGISTERED.keys())
def test_registered_types_roundtrip(value: object) -> None:
    assert_same(value, roundtrip(value, make_codec()))  # a dataclass's == also compares its fields' classes


def test_registered_types_are_matched_exactly() -> None:
    with pytest.raises(SerializationError, match=r"'.*SubPoint'"):
        pack_value([SubPoint(1, 2)], make_codec())


def test_registering_is_per_codec() -> None:
    make_codec()
    with pytest.raises(SerializationError, match=r"'.*Point'"):
        pack_value(Point(1, 2), None)
    with pytest.raises(SerializationError, match=r"'.*Point'"):
        pack_value(Point(1, 2), Codec())


def test_unknown_registered_code_at_unpack_is_corrupt() -> None:
    payload = pack_value([Point(1, 2)], make_codec())
    with pytest.raises(MPFlightError, match="corrupt result: unknown ext code 32"):
        unpack(payload, None, key=KEY, owner_pid=PID)


def test_a_codec_with_other_codes_does_not_decode_it() -> None:
    other = Codec()
    other.register(Point, 1, lambda p: (p.x, p.y), lambda t: Point(*t))
    with pytest.raises(MPFlightError, match="unknown ext code 32"):
        unpack(pack_value(Point(1, 2), make_codec()), other, key=KEY, owner_pid=PID)


@pytest.mark.parametrize(
    ("type_", "code", "error", "message"),
    [
        (Point, 1, ValueError, "'.*Point' is registered already"),
        (MyStr, 0, ValueError, "code 0 is registered already"),
        (MyStr, 64, ValueError, r"code must be in 0\.\.63, not 64"),
        (MyStr, -1, ValueError, r"code must be in 0\.\.63, not -1"),
        (MyStr, "1", TypeError, "code must be an int"),
        (MyStr, 1.0, TypeError, "code must be an int"),
        (MyStr, True, TypeError, "code must be an int"),
        (Point(1, 2), 1, TypeError, "type_ must be a class"),
        ("str", 1, TypeError, "type_ must be a class"),
        (int, 1, ValueError, "'int' is written by mpflight or msgpack itself"),
        (str, 1, ValueError, "'str' is written by"),
        (tuple, 1, ValueError, "'tuple' is written by"),
        (type(None), 1, ValueError, "'NoneType' is written by"),
        (datetime, 1, ValueError, "'datetime.datetime' is written by"),
        (Decimal, 1, ValueError, "'decimal.Decimal' is written by"),
        (uuid.UUID, 1, ValueError, "'uuid.UUID' is written by"),
        (bytearray, 1, ValueError, "'bytearray' is written by"),
        (memoryview, 1, ValueError, "'memoryview' is written by"),
        (msgpack.ExtType, 1, ValueError, "'msgpack.ext.ExtType' is written by"),
    ],
)
def test_register_refuses(type_: Any, code: Any, error: type[Exception], message: str) -> None:
    codec = Codec()
    codec.register(Point, 0, repr, repr)
    with pytest.raises(error, match=message):
        codec.register(type_, code, repr, repr)


def test_register_refuses_what_is_not_callable() -> None:
    with pytest.raises(TypeError, match="callable"):
        Codec().register(Point, 0, "encode", repr)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        Codec().register(Point, 0, repr, None)  # type: ignore[arg-type]


def test_a_refused_registration_changes_nothing() -> None:
    codec = Codec()
    with pytest.raises(ValueError):
        codec.register(Point, 99, repr, repr)
    codec.register(Point, 0, lambda p: [p.x, p.y], lambda v: Point(*v))
    assert roundtrip(Point(1, 2), codec) == Point(1, 2)


def test_a_failing_registered_encode_is_a_serialization_error() -> None:
    codec = Codec()
    codec.register(Point, 0, lambda p: 1 / 0, repr)
    with pytest.raises(SerializationError, match=r"registered encode for '.*Point' raised division by zero"):
        pack_value([Point(1, 2)], codec)


def test_an_encode_that_returns_what_cannot_be_carried_names_it() -> None:
    codec = Codec()
    codec.register(Point, 0, lambda p: object(), repr)
    with pytest.raises(SerializationError, match="cannot carry a value of type 'object'"):
        pack_value(Point(1, 2), codec)


def test_an_encode_that_returns_its_own_type_is_refused() -> None:
    codec = Codec()
    codec.register(Point, 0, lambda p: p, repr)
    with pytest.raises(SerializationError):
        pack_value(Point(1, 2), codec)


@pytest.mark.parametrize("raised", [ValueError("no"), RecursionError("deep"), KeyError("k")])
def test_a_failing_registered_decode_is_an_mpflight_error(raised: Exception) -> None:
    def decode(value: object) -> object:
        raise raised

    codec = Codec()
    codec.register(Point, 0, lambda p: [p.x, p.y], decode)
    payload = pack_value({"p": Point(1, 2)}, codec)
    with pytest.raises(MPFlightError, match=r"registered decode for '.*Point' raised"):
        unpack(payload, codec, key=KEY, owner_pid=PID)


# --- errors ----------------------------------------------------------------------------------------------


def raised(exc: BaseException) -> BaseException:
    """``exc`` with a traceback, as fn would leave it."""
    try:
        raise exc
    except BaseException as caught:
        return caught


def reraise(exc: BaseException, codec: Codec | None = None) -> BaseException:
    payload = pack_error(exc, codec)
    with pytest.raises(BaseException) as caught:
        unpack(payload, codec, key=KEY, owner_pid=PID)
    return caught.value


def check_owner_traceback(rebuilt: BaseException, original: BaseException, hint: str | None = None) -> None:
    cause = rebuilt.__cause__
    assert type(cause) is RemoteTraceback
    assert str(cause) == "".join(traceback.format_exception(original))
    assert "in raised" in str(cause), "the owner's frames are in it"
    notes = getattr(rebuilt, "__notes__", [])
    if hint is not None:  # an unregistered type: a note says how to register it, before the owner's
        assert len(notes) == 2 and notes[0].startswith(f"{hint} is not registered to travel")
        assert f"errors=[{hint}]" in notes[0]
        notes = notes[1:]
    assert len(notes) == 1
    assert notes[0].startswith(f"raised in the owner process (pid {PID}) of the call for key {KEY!r}:\n")
    assert notes[0].endswith(str(cause))


BUILTIN_ERRORS: dict[str, BaseException] = {
    "ValueError": ValueError("boom", 42, (1, 2)),
    "KeyError": KeyError("k"),
    "OSError": OSError("plain"),
    "FileNotFoundError": OSError(errno.ENOENT, "No such file or directory", "/nowhere"),
    "PermissionError": PermissionError(errno.EACCES, "Permission denied", "/a", None, "/b"),
    "UnicodeDecodeError": UnicodeDecodeError("utf-8", b"\xff\xfe", 0, 1, "invalid start byte"),
    "ZeroDivisionError": ZeroDivisionError("division by zero"),
    "StopIteration": StopIteration({"v": (1,)}),
    "TimeoutError": TimeoutError("slow"),
    "no args": RuntimeError(),
    "warning": DeprecationWarning("old"),
}


@pytest.mark.parametrize("exc", BUILTIN_ERRORS.values(), ids=BUILTIN_ERRORS.keys())
def test_builtin_exceptions_are_rebuilt(exc: BaseException) -> None:
    original = raised(exc)
    rebuilt = reraise(original)
    assert type(rebuilt) is type(original)
    assert_same(original.args, rebuilt.args)
    assert str(rebuilt) == str(original)
    check_owner_traceback(rebuilt, original)


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), GeneratorExit()], ids=repr)
def test_base_exceptions_are_never_rebuilt(exc: BaseException) -> None:
    """A payload naming a BaseException that is not an Exception (only a damaged or hostile payload can:
    owners publish those as aborts) arrives as RemoteError, so it cannot escape ``except Exception``."""
    rebuilt = reraise(raised(exc))
    assert type(rebuilt) is RemoteError
    assert rebuilt.type_name == type(exc).__qualname__


def test_oserror_keeps_errno_and_filenames() -> None:
    rebuilt = reraise(raised(PermissionError(errno.EACCES, "Permission denied", "/a", None, "/b")))
    assert isinstance(rebuilt, PermissionError)
    assert (rebuilt.errno, rebuilt.strerror, rebuilt.filename, rebuilt.filename2) == (
        errno.EACCES,
        "Permission denied",
        "/a",
        "/b",
    )


def test_unicode_decode_error_keeps_its_fields() -> None:
    rebuilt = reraise(raised(UnicodeDecodeError("utf-8", b"\xff\xfe", 0, 1, "invalid start byte")))
    assert isinstance(rebuilt, UnicodeDecodeError)
    assert (rebuilt.encoding, rebuilt.object, rebuilt.start, rebuilt.end) == ("utf-8", b"\xff\xfe", 0, 1)


OWN_ERRORS: dict[str, MPFlightError] = {
    "MPFlightError": MPFlightError("plain"),
    "AbortError": AbortError(b"k", 12, "owner died"),
    "SerializationError": SerializationError("cannot carry"),
    "RemoteError": RemoteError("m.T", "msg", "tb text"),
    "DeadlockError": DeadlockError(["a", b"b"]),
}


@pytest.mark.parametrize("exc", OWN_ERRORS.values(), ids=OWN_ERRORS.keys())
def test_mpflight_errors_are_rebuilt_with_their_data(exc: MPFlightError) -> None:
    original = raised(exc)
    rebuilt = reraise(original)
    assert type(rebuilt) is type(original)
    assert str(rebuilt) == str(original)
    assert {k: v for k, v in vars(rebuilt).items() if k != "__notes__"} == vars(original)
    check_owner_traceback(rebuilt, original)


class CustomError(Exception):
    pass


class Outer:
    class InnerError(LookupError):
        pass


class MyValueError(ValueError):
    pass


@pytest.mark.parametrize(
    "exc",
    [CustomError("custom message", 1), Outer.InnerError("inner"), MyValueError("a subclass of a builtin")],
    ids=["custom", "nested class", "builtin subclass"],
)
def test_other_exceptions_become_remote_errors(exc: Exception) -> None:
    original = raised(exc)
    rebuilt = reraise(original)
    assert type(rebuilt) is RemoteError
    assert rebuilt.type_name == f"{__name__}.{type(exc).__qualname__}"
    assert rebuilt.message == str(exc)
    assert rebuilt.traceback == "".join(traceback.format_exception(original))
    assert str(rebuilt) == f"{rebuilt.type_name}: {exc}"
    check_owner_traceback(rebuilt, original, hint=rebuilt.type_name)


class Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


def test_builtin_exception_whose_args_cannot_be_carried() -> None:
    original = raised(ValueError(Opaque(), 1))
    rebuilt = reraise(original)
    assert type(rebuilt) is RemoteError
    assert (rebuilt.type_name, rebuilt.message) == ("ValueError", "(<opaque>, 1)")
    check_owner_traceback(rebuilt, original)


def test_args_of_a_registered_type_are_carried_with_the_codec() -> None:
    codec = make_codec()
    rebuilt = reraise(raised(ValueError(Point(1, 2))), codec)
    assert type(rebuilt) is ValueError and rebuilt.args == (Point(1, 2),)


def test_exception_groups_become_remote_errors() -> None:
    rebuilt = reraise(raised(ExceptionGroup("several", [ValueError(1), KeyError(2)])))
    assert type(rebuilt) is RemoteError and rebuilt.type_name == "ExceptionGroup"
    assert "ValueError: 1" in rebuilt.traceback


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


class BadArgs(Exception):
    @property
    def args(self) -> tuple[object, ...]:  # type: ignore[override]
        raise RuntimeError("no args")


class WeirdModule(Exception):
    pass


WeirdModule.__module__ = None  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("exc", "type_name", "message"),
    [
        (BadStr(), f"{__name__}.BadStr", "<exception str() failed>"),
        (BadArgs("x"), f"{__name__}.BadArgs", "x"),
        (ValueError("lone \udc80 surrogate"), "ValueError", "lone \\udc80 surrogate"),
        (WeirdModule("w"), "None.WeirdModule", "w"),
    ],
)
def test_pack_error_never_raises(exc: Exception, type_name: str, message: str) -> None:
    rebuilt = reraise(raised(exc))
    if type(rebuilt) is RemoteError:
        assert (rebuilt.type_name, rebuilt.message) == (type_name, message)
    else:
        assert type(rebuilt) is type(exc) and str(rebuilt) == message
    assert isinstance(rebuilt.__cause__, RemoteTraceback)


def test_pack_error_without_a_traceback() -> None:
    """An exception that was never raised has no frames; it is still carried."""
    rebuilt = reraise(KeyError("k"))
    assert type(rebuilt) is KeyError and str(rebuilt.__cause__) == "KeyError: 'k'\n"


def error_payload(module: str, qualname: str, args: list[object] | None, message: str = "m") -> bytes:
    return b"\x92\x01" + bytes(msgpack.packb([module, qualname, args, message, "tb", None, None]))


@pytest.mark.parametrize(
    ("module", "qualname", "args", "type_name"),
    [
        ("this", "Error", ["x"], "this.Error"),
        ("os", "system", ["echo unsafe"], "os.system"),
        ("builtins", "eval", ["1/0"], "eval"),
        ("builtins", "print", ["printed"], "print"),
        ("builtins", "object", [], "object"),
        ("builtins", "type", ["x", [], {}], "type"),
        ("builtins", "ValueError.__init__", [], "ValueError.__init__"),
        ("builtins", "__import__", ["this"], "__import__"),
        ("mpflight._errors", "short_key", ["k"], "mpflight._errors.short_key"),
        ("mpflight", "AbortError", ["k", 1], "mpflight.AbortError"),
        ("builtins", "OSError", [2, "x"], "OSError"),  # OSError(2, ...) makes a FileNotFoundError
        ("builtins", "ValueError", None, "ValueError"),
        ("builtins", "UnicodeDecodeError", ["wrong", "args"], "UnicodeDecodeError"),
    ],
)
def test_unpack_imports_and_calls_nothing_named_in_a_payload(
    module: str, qualname: str, args: list[object] | None, type_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = set(sys.modules)
    with pytest.raises(RemoteError) as caught:
        unpack(error_payload(module, qualname, args), None, key=KEY, owner_pid=PID)
    assert caught.value.type_name == type_name
    assert set(sys.modules) == before
    assert capsys.readouterr() == ("", "")


def test_abort() -> None:
    with pytest.raises(AbortError) as caught:
        unpack(pack_abort("owner died"), None, key=b"\x00key", owner_pid=77)
    assert (caught.value.key, caught.value.owner_pid, caught.value.reason) == (b"\x00key", 77, "owner died")


def test_not_carried() -> None:
    with pytest.raises(SerializationError) as caught:
        unpack(pack_not_carried("cannot carry a value of type 'x.Y'"), None, key=KEY, owner_pid=PID)
    assert type(caught.value) is SerializationError
    assert caught.value.message == "cannot carry a value of type 'x.Y'"


def test_messages_that_are_not_utf8_are_still_packed() -> None:
    with pytest.raises(AbortError, match=r"lone \\udc80"):
        unpack(pack_abort("lone \udc80"), None, key=KEY, owner_pid=PID)
    with pytest.raises(SerializationError, match=r"lone \\udc80"):
        unpack(pack_not_carried("lone \udc80"), None, key=KEY, owner_pid=PID)


# --- corrupt payloads ------------------------------------------------------------------------------------


def expect_corrupt(payload: bytes | memoryview, codec: Codec | None = None) -> MPFlightError:
    with pytest.raises(MPFlightError) as caught:
        unpack(payload, codec, key=KEY, owner_pid=PID)
    assert type(caught.value) is CorruptPayload
    assert str(caught.value).startswith("corrupt result: ")
    return caught.value


SAMPLES: dict[str, bytes] = {
    "value": pack_value(VALUES["mixture"], None),
    "every value": pack_value(list(VALUES.values()), None),
    "registered": pack_value(REGISTERED["tree"], make_codec()),
    "bytes": pack_value(b"x" * 300, None),
    "error": pack_error(raised(ValueError("boom", (1, 2))), None),
    "abort": pack_abort("owner died"),
    "not carried": pack_not_carried("too big"),
}


@pytest.mark.parametrize("payload", SAMPLES.values(), ids=SAMPLES.keys())
def test_every_truncation_is_corrupt(payload: bytes) -> None:
    codec = make_codec()
    for end in range(len(payload)):
        expect_corrupt(payload[:end], codec)
        expect_corrupt(memoryview(payload)[:end], codec)


@pytest.mark.parametrize("payload", SAMPLES.values(), ids=SAMPLES.keys())
def test_trailing_bytes_are_corrupt(payload: bytes) -> None:
    expect_corrupt(payload + b"\x00", make_codec())


def outcome_of(payload: bytes, codec: Codec | None = None) -> str:
    """Unpack; say how it ended. Anything but a value, a corrupt result or a carried exception fails."""
    try:
        unpack(payload, codec, key=KEY, owner_pid=PID)
    except MPFlightError as e:
        if str(e).startswith("corrupt result: "):
            return "corrupt"
        assert isinstance(e, RemoteError | AbortError | SerializationError) or isinstance(
            e.__cause__, RemoteTraceback
        ), repr(e)
        return "outcome"
    except BaseException as e:  # only an exception the payload carries, rebuilt
        assert isinstance(e.__cause__, RemoteTraceback), repr(e)
        return "outcome"
    return "value"


def test_random_bytes() -> None:
    rng = random.Random(20240601)
    seen = collections.Counter(outcome_of(rng.randbytes(rng.randrange(0, 40))) for _ in range(3000))
    assert seen["corrupt"] > 2500


@pytest.mark.parametrize("tag", [0, 1, 2, 3])
def test_random_bodies(tag: int) -> None:
    rng = random.Random(tag)
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(3000):
        body = rng.randbytes(rng.randrange(1, 30))
        result = outcome_of(bytes((0x92, tag)) + body, make_codec())
        if tag == 0:
            assert result in ("value", "corrupt")
        seen[result] += 1
    assert seen["corrupt"] > 1000


@pytest.mark.parametrize("payload", SAMPLES.values(), ids=SAMPLES.keys())
def test_mutated_payloads(payload: bytes) -> None:
    rng = random.Random(len(payload))
    codec = make_codec()
    for _ in range(1000):
        mutated = bytearray(payload)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        outcome_of(bytes(mutated), codec)


def ext(code: int, data: bytes) -> bytes:
    """An ext 16 (any code, negative too; msgpack.ExtType takes 0..127 only)."""
    return b"\xc8" + len(data).to_bytes(2, "big") + code.to_bytes(1, "big", signed=True) + data


def value_payload(*parts: bytes) -> bytes:
    return b"\x92\x00" + b"".join(parts)


MARK = b"\xc7\x00\x00"  # the tuple marker, as msgpack writes it

CORRUPT: dict[str, bytes] = {
    "empty": b"",
    "one byte": b"\x92",
    "header only": b"\x92\x00",
    "not an array": b"\x00\x00\x00",
    "array of one": b"\x91\x00\x00",
    "array of three": b"\x93\x00\x00\x00",
    "tag 4": b"\x92\x04\x00",
    "tag 255": b"\x92\xff\x00",
    "tag as a str": b"\x92\xa1a\x00",
    "error body not a list": b"\x92\x01\xa1x",
    "error with 4 fields": b"\x92\x01" + msgpack.packb(["builtins", "ValueError", [], "m"]),
    "error with 6 fields": b"\x92\x01" + msgpack.packb(["builtins", "ValueError", [], "m", "tb", 1]),
    "error module not str": b"\x92\x01" + msgpack.packb([1, "ValueError", [], "m", "tb"]),
    "error args a map": b"\x92\x01" + msgpack.packb(["builtins", "ValueError", {}, "m", "tb"]),
    "error args a tuple": b"\x92\x01\x95\xa8builtins\xaaValueError\x91" + MARK + b"\xa1m\xa2tb",
    "error tb bytes": b"\x92\x01" + msgpack.packb(["builtins", "ValueError", [], "m", b"tb"]),
    "abort reason int": b"\x92\x02\x01",
    "abort reason nil": b"\x92\x02\xc0",
    "abort reason bytes": b"\x92\x02\xc4\x01x",
    "not carried list": b"\x92\x03\x91\xa1m",
    "invalid utf-8": value_payload(b"\xa2\xff\xfe"),
    "reserved byte": value_payload(b"\xc1"),
    "unknown ext 10": value_payload(ext(10, b"x")),
    "unknown ext 31": value_payload(ext(31, b"")),
    "unknown ext 96": value_payload(ext(96, b"")),
    "unknown ext 127": value_payload(ext(127, b"x")),
    "negative ext": value_payload(ext(-5, b"x")),
    "marker with data": value_payload(b"\x91", ext(0, b"x")),
    "marker alone": value_payload(MARK),
    "marker first": value_payload(b"\x92", MARK, b"\x01"),
    "marker in the middle": value_payload(b"\x93\x01", MARK, b"\x02"),
    "two markers at the end": value_payload(b"\x93\x01", MARK, MARK),
    "marker as a map value": value_payload(b"\x81\x01", MARK),
    "marker as a map key": value_payload(b"\x81", MARK, b"\x01"),
    "set of a list": value_payload(b"\x92\x91\x01", ext(1, b"")),
    "set as a map key": value_payload(b"\x81\x92\x01", ext(1, b""), b"\x01"),
    "list as a map key": value_payload(b"\x81\x91\x01\x01"),
    "nested too deep": value_payload(b"\x91" * 3000, b"\xc0"),
    "datetime month 13": value_payload(ext(4, bytes([7, 228, 13, 1, 0, 0, 0, 0, 0, 0, 0, 0]))),
    "datetime fold 2": value_payload(ext(4, bytes([7, 228, 1, 1, 0, 0, 0, 0, 0, 0, 0, 2]))),
    "datetime short": value_payload(ext(4, bytes(11))),
    "datetime tz kind 9": value_payload(ext(4, bytes([7, 228, 1, 1]) + bytes(8) + b"\x09")),
    "datetime offset short": value_payload(ext(4, bytes([7, 228, 1, 1]) + bytes(8) + b"\x01\x00")),
    "datetime offset trailing": value_payload(ext(4, bytes([7, 228, 1, 1]) + bytes(8) + b"\x01" + bytes(9))),
    "datetime offset 24h": value_payload(
        ext(4, bytes([7, 228, 1, 1]) + bytes(8) + b"\x01" + (86_400_000_000).to_bytes(8, "big"))
    ),
    "datetime name not utf-8": value_payload(
        ext(4, bytes([7, 228, 1, 1]) + bytes(8) + b"\x02" + bytes(8) + b"\xff")
    ),
    "time hour 24": value_payload(ext(6, bytes([24, 0, 0, 0, 0, 0, 0, 0]))),
    "zone path": value_payload(ext(6, bytes(8) + b"\x03../../../../etc/passwd")),
    "zone absolute": value_payload(ext(6, bytes(8) + b"\x03/etc/localtime")),
    "zone unknown": value_payload(ext(6, bytes(8) + b"\x03Nowhere/Special")),
    "zone directory": value_payload(ext(6, bytes(8) + b"\x03America")),
    "zone nul": value_payload(ext(6, bytes(8) + b"\x03UTC\x00")),
    "zone empty": value_payload(ext(6, bytes(8) + b"\x03")),
    "zone too long": value_payload(ext(6, bytes(8) + b"\x03" + b"A" * 300)),
    "zone that ZoneInfo normalizes": value_payload(ext(6, bytes(8) + b"\x03Etc/../UTC")),
    "zone with a dot": value_payload(ext(6, bytes(8) + b"\x03Etc/./UTC")),
    "zone not ascii": value_payload(ext(6, bytes(8) + b"\x03\xc3\xa9")),
    "date short": value_payload(ext(5, b"\x07\xe4\x01")),
    "date long": value_payload(ext(5, b"\x07\xe4\x01\x01\x00")),
    "date day 0": value_payload(ext(5, b"\x07\xe4\x01\x00")),
    "timedelta too big": value_payload(ext(7, (10**9).to_bytes(4, "big") + bytes(8))),
    "decimal not a number": value_payload(ext(8, b"abc")),
    "decimal not ascii": value_payload(ext(8, b"\xff")),
    "decimal exponent overflow": value_payload(ext(8, b"1e1000000000000000000")),
    "uuid 15 bytes": value_payload(ext(9, bytes(15))),
    "uuid 17 bytes": value_payload(ext(9, bytes(17))),
    "registered with two parts": value_payload(b"\x93\x01\x02", ext(32, b"")),
    "registered with no parts": value_payload(b"\x91", ext(32, b"")),
}


@pytest.mark.parametrize("payload", CORRUPT.values(), ids=CORRUPT.keys())
def test_corrupt_payloads(payload: bytes) -> None:
    expect_corrupt(payload, make_codec())
    with memoryview(bytearray(payload)) as view:
        expect_corrupt(view, make_codec())


@pytest.mark.parametrize(
    "key",
    [b"Etc/../UTC", b"../x", b"/etc/localtime", b"tzdata.zoneinfo/x", b"UTC\x00", b"", b"a//b", b"A" * 256],
)
def test_a_zone_key_that_is_not_iana_shaped_never_reaches_zoneinfo(
    key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ZoneInfo opens files by key, and with the tzdata package imports its subpackages by key."""
    good = pack_value(time(1, tzinfo=NEW_YORK), None)
    asked: list[str] = []

    def spy(key: str) -> ZoneInfo:
        asked.append(key)
        return NEW_YORK

    monkeypatch.setattr(_codec, "ZoneInfo", spy)
    unpack(good, None, key=KEY, owner_pid=PID)
    assert asked == ["America/New_York"], "the spy is in place"
    asked.clear()
    expect_corrupt(value_payload(ext(6, bytes(8) + b"\x03" + key)))
    assert asked == []


@pytest.mark.parametrize(
    "head",
    [b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9", b"\xdc", b"\xde", b"\xda", b"\xc5"],
    ids=["array32", "map32", "str32", "bin32", "ext32", "array16", "map16", "str16", "bin16"],
)
def test_huge_declared_lengths_allocate_nothing(head: bytes) -> None:
    width = 2 if head in (b"\xdc", b"\xde", b"\xda", b"\xc5") else 4
    payload = value_payload(head, b"\xff" * width, b"\x05" * 8)
    tracemalloc.start()
    try:
        expect_corrupt(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_a_buffer_of_another_format_is_corrupt() -> None:
    with memoryview(array.array("I", [0x92, 0, 0])) as view:
        expect_corrupt(view)


@pytest.mark.parametrize(
    ("payload", "raises"),
    [
        (pack_value([1, (2,), b"x" * 5000], None), None),
        (SAMPLES["error"], ValueError),
        (SAMPLES["abort"], AbortError),
        (b"\x92\x00\xc1", CorruptPayload),
        (value_payload(b"\x81\x01", MARK), CorruptPayload),
    ],
    ids=["value", "error", "abort", "corrupt", "leaked marker"],
)
def test_unpack_leaves_no_view_of_the_buffer(payload: bytes, raises: type[BaseException] | None) -> None:
    """A waiter closes the segment after unpack, even while the exception unpack raised is still alive."""
    buffer = bytearray(payload)
    kept: list[BaseException] = []
    with memoryview(buffer) as view:
        try:
            unpack(view, None, key=KEY, owner_pid=PID)
        except BaseException as e:
            kept.append(e)
    buffer.extend(b"\x00")  # raises BufferError while any view of buffer is alive
    assert [type(e) for e in kept] == ([] if raises is None else [raises])


# --- large values ----------------------------------------------------------------------------------------


def allocated_while(step: Callable[[], object]) -> tuple[object, int]:
    """Run ``step``; return its result and the most memory it held at once beyond what it returned."""
    before, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    result = step()
    _, peak = tracemalloc.get_traced_memory()
    return result, peak - before


def test_16_mib_of_bytes_is_copied_once_each_way() -> None:
    value = bytes(range(256)) * (16 * MIB // 256)
    tracemalloc.start()
    try:
        payload, packing = allocated_while(lambda: pack_value(value, None))
        assert isinstance(payload, bytes)
        with memoryview(payload) as view:
            out, unpacking_view = allocated_while(lambda: unpack(view, None, key=KEY, owner_pid=PID))
        out_of_bytes, unpacking_bytes = allocated_while(lambda: unpack(payload, None, key=KEY, owner_pid=PID))
    finally:
        tracemalloc.stop()
    assert type(out) is bytes and out == value and out_of_bytes == value
    # One copy is the result itself; a second one would add another 16 MiB.
    for held in (packing, unpacking_view, unpacking_bytes):
        assert 16 * MIB <= held < 17 * MIB
