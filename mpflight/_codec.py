"""Outcomes as bytes: what a call's owner hands its waiters through shared memory.

The owner packs exactly one payload per call (``pack_value``, ``pack_error``, ``pack_abort`` or
``pack_not_carried``); every waiter calls ``unpack`` on it, which returns the value or raises. Nothing is
ever pickled and nothing named in a payload is ever imported: an exception comes back as itself only when
its type is a built-in exception, one of mpflight's own errors, or a type the reader registered
(``Codec.register_error``, ``Group(errors=...)``, or ``Codec.register`` with its own encoding), and as
``RemoteError`` otherwise. A rebuilt exception has the owner's args and attributes; its class is the
reader's own, looked up by name among what the reader registered.

Wire format
-----------
A payload is one msgpack array of two items, ``[tag, body]``; the tag is a positive fixint, so every
payload starts with the two bytes ``0x92 tag``:

=============  ==========================================================================================
tag            body
=============  ==========================================================================================
0 VALUE        the value
1 ERROR        ``[module, qualname, args, message, traceback, attrs, whole]``: str, str, array or nil (nil
               when the args could not be carried), ``str(exc)``, ``traceback.format_exception`` text,
               a map of the exception's attributes (``__dict__``, ``__notes__`` included) that could be
               carried, or nil; and the exception itself when its type is registered with
               ``Codec.register`` (else nil)
2 ABORT        the reason (str)
3 NOT_CARRIED  the message (str) of the SerializationError the owner met
=============  ==========================================================================================

A value of type bytes is always framed as bin 32 (``0x92 0x00 0xc6`` + length), which lets ``pack_value``
copy it once.

``unpack`` reads the two header bytes itself and hands msgpack only the body. msgpack's packer counts
nesting by objects (at most 1025, leaves included) and its unpacker by containers (at most 1024): because
the packer also counted the outer array and the unpacker does not, every value that packs also unpacks.

msgpack itself writes None, bool, int in [-2**63, 2**64), float, str, bytes, list and dict (keys of any
carried hashable type). Every other type is one of these ext types:

=====  ==========  ==========================================================================================
code   type        data
=====  ==========  ==========================================================================================
0      tuple       none: a marker (below)
1      set         marker
2      frozenset   marker
3      int         outside int64/uint64: two's complement, big-endian, the fewest bytes that hold the sign
4      datetime    ``>HBBBBBIB`` year, month, day, hour, minute, second, microsecond, fold; then a tz
5      date        ``>HBB`` year, month, day
6      time        ``>BBBIB`` hour, minute, second, microsecond, fold; then a tz
7      timedelta   ``>iii`` days, seconds, microseconds
8      Decimal     ``str(d)`` in ASCII (exact: sign, digits, exponent, NaN payloads)
9      UUID        the 16 bytes
10-31              reserved for mpflight
32-95  registered  ``Codec.register(type_, code, ...)`` travels as ext 32 + code: a marker
=====  ==========  ==========================================================================================

A tz is empty (naive), ``0x01`` + ``>q`` offset in microseconds (``timezone(offset)``), ``0x02`` + ``>q``
offset + UTF-8 name (``timezone(offset, name)``) or ``0x03`` + ASCII key (``ZoneInfo(key)``). Other tzinfo
classes are not carried.

A marker is an ext with no data that ends the array of its object's parts: ``(1, 2)`` is written
``[1, 2, ext(0)]``, a set or frozenset as its items then its marker, a registered object as
``[encode(obj), ext(32 + code)]``. The parts ride in the same msgpack object as the rest of the value, so
the whole value obeys msgpack's single nesting limit and is encoded and decoded without Python recursion,
and a tuple or frozenset can be a dict key (the unpacker rebuilds an array through ``list_hook`` before
hashing it). ``unpack`` counts markers: one anywhere but at the end of an array is corruption.

Types are matched exactly (msgpack's ``strict_types``): a subclass (a namedtuple, an IntEnum, an
OrderedDict, a str subclass...) raises SerializationError naming it rather than arriving as its base type.
Not so for what msgpack writes itself, before mpflight is asked: ``bytearray`` and ``memoryview`` are
refused as the whole value, but inside a container they arrive as ``bytes`` (refusing them there would
take a second walk of every value); msgpack's own ``ExtType`` and ``Timestamp`` are likewise refused as the
whole value and passed through as written inside one. Do not put them in values.

A corrupt payload raises MPFlightError ("corrupt result: ...") and nothing else: sizes are bounded by the
payload's length (``unpackb`` derives its limits from it), shapes are checked strictly, and ext data is
parsed by fixed structs. The codec checks structure, not integrity: a flipped bit in an int decodes to
another int.
"""

from __future__ import annotations

import builtins
import contextlib
import re
import struct
import traceback
from collections.abc import Callable
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, Final, cast
from uuid import UUID
from zoneinfo import ZoneInfo

import msgpack

from ._errors import (
    AbortError,
    AccessDenied,
    CorruptPayload,
    CorruptSlot,
    DamagedTable,
    DeadlockError,
    IncompatibleTable,
    MPFlightError,
    NoSpace,
    NoSuchTable,
    NotInitialised,
    RemoteError,
    RemoteTraceback,
    SegmentFull,
    SerializationError,
    TierUnavailable,
    WaitTimeout,
    short_key,
)

__all__ = [
    "ABORT",
    "ERROR",
    "NOT_CARRIED",
    "VALUE",
    "Codec",
    "pack_abort",
    "pack_error",
    "pack_not_carried",
    "pack_value",
    "unpack",
]

# Outcome tags: the first item of every payload.
VALUE: Final = 0  # fn returned; the body is its value
ERROR: Final = 1  # fn raised; the body describes the exception
ABORT: Final = 2  # the call ended without an outcome; the body is the reason
NOT_CARRIED: Final = 3  # fn returned a value that could not be packed; the body is why

_FRAME: Final = 0x92  # msgpack fixarray of two: the [tag, body] every payload is
_HEADER_SIZE: Final = 2  # _FRAME and the tag byte, read by unpack itself

# Ext codes mpflight writes (see the table above). Registered codes sit above every code mpflight reserves.
_EXT_TUPLE: Final = 0
_EXT_SET: Final = 1
_EXT_FROZENSET: Final = 2
_EXT_INT: Final = 3
_EXT_DATETIME: Final = 4
_EXT_DATE: Final = 5
_EXT_TIME: Final = 6
_EXT_TIMEDELTA: Final = 7
_EXT_DECIMAL: Final = 8
_EXT_UUID: Final = 9
_EXT_REGISTERED: Final = 32  # registered code c is written as ext 32 + c
_REGISTERED_CODES: Final = 64  # registered codes are 0..63, so ext codes 32..95

_DATETIME: Final = struct.Struct(">HBBBBBIB")  # year, month, day, hour, minute, second, microsecond, fold
_TIME: Final = struct.Struct(">BBBIB")  # hour, minute, second, microsecond, fold
_DATE: Final = struct.Struct(">HBB")  # year, month, day
_TIMEDELTA: Final = struct.Struct(">iii")  # days (|days| <= 999999999), seconds, microseconds
_OFFSET: Final = struct.Struct(">q")  # a fixed UTC offset in microseconds (|offset| < 24 h)

# The kind byte that starts a datetime's or time's tz.
_TZ_OFFSET: Final = 1  # timezone(offset), its name the default one
_TZ_NAMED_OFFSET: Final = 2  # timezone(offset, name)
_TZ_ZONE: Final = 3  # ZoneInfo(key)

# An IANA key: the only text in a payload that names anything. ZoneInfo opens a file by it and, with the
# tzdata package installed, imports tzdata.zoneinfo subpackages named by it; a key of this shape names no
# other path or module. Checked when packing too, so that what packs unpacks.
_ZONE_KEY: Final = re.compile(r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*")
_ZONE_KEY_MAX: Final = 255  # longer than any IANA key; bounds what ZoneInfo is asked to open

# Top-level bytes are framed by hand ([VALUE, bin 32]) so a large value is copied once, into the payload;
# through msgpack's packer it would be copied into the packer's buffer and then out of it.
_BYTES_FRAME: Final = struct.Struct(">BBBI")  # _FRAME, VALUE, 0xC6 (bin 32), length
_BIN32_MAX: Final = 2**32 - 1  # the largest length a bin 32 header can state

# Initial size of a Packer's buffer: most payloads are small, and msgpack grows the buffer by doubling. Its
# default (256 KiB) costs an allocation that large on every call.
_PACK_BUFFER: Final = 4096

# unpack copies the body of a bytes payload up to this size rather than view it: below it, the copy is the
# cheaper of the two (measured: equal at about 4 KiB).
_COPY_MAX: Final = 4096

_DETAIL_MAX: Final = 200  # characters of an underlying error's message kept in one of ours


def _type_name(cls: type) -> str:
    """Name a type as 'module.QualName' (a built-in by its bare name, as Python's own messages do)."""
    return _qualified(str(cls.__module__), cls.__qualname__)


def _qualified(module: str, qualname: str) -> str:
    return qualname if module in ("", "builtins") else f"{module}.{qualname}"


def _describe(exc: BaseException) -> str:
    """``exc``'s message for one of ours: short, and never raising (str() of a foreign exception can)."""
    try:
        detail = str(exc)
    except Exception:
        detail = ""
    detail = detail or type(exc).__name__
    return detail if len(detail) <= _DETAIL_MAX else detail[:_DETAIL_MAX] + "..."


def _not_carried(obj: object) -> SerializationError:
    return SerializationError(f"cannot carry a value of type {_type_name(type(obj))!r}")


# ExtType validates its fields in Python on every construction (~0.4 us). The ext objects built here are valid
# by construction, so build the namedtuple directly; the tests round-trip every one of them.
_new_tuple: Final = tuple.__new__


def _ext(code: int, data: bytes) -> object:
    return _new_tuple(msgpack.ExtType, (code, data))


def _marker_ext(code: int) -> object:
    return msgpack.ExtType(code, b"")


_TUPLE_MARK: Final = _marker_ext(_EXT_TUPLE)
_SET_MARK: Final = _marker_ext(_EXT_SET)
_FROZENSET_MARK: Final = _marker_ext(_EXT_FROZENSET)


# --- encoders: called by msgpack (through Codec._default) for each object it cannot write itself -----------


def _encode_tuple(obj: tuple[object, ...]) -> list[object]:
    return [*obj, _TUPLE_MARK]


def _encode_set(obj: set[object]) -> list[object]:
    return [*obj, _SET_MARK]


def _encode_frozenset(obj: frozenset[object]) -> list[object]:
    return [*obj, _FROZENSET_MARK]


def _encode_int(obj: int) -> object:
    # msgpack hands over only ints outside int64/uint64. bit_length() excludes the sign, hence the + 1 bit.
    return _ext(_EXT_INT, obj.to_bytes(obj.bit_length() // 8 + 1, "big", signed=True))


def _encode_tz(tz: object) -> bytes:
    if tz is None:
        return b""
    if type(tz) is timezone:
        offset = tz.utcoffset(None)
        micros = (offset.days * 86400 + offset.seconds) * 1_000_000 + offset.microseconds
        name = tz.tzname(None)
        if name == timezone(offset).tzname(None):
            return bytes((_TZ_OFFSET,)) + _OFFSET.pack(micros)
        return bytes((_TZ_NAMED_OFFSET,)) + _OFFSET.pack(micros) + name.encode()
    if type(tz) is ZoneInfo:
        key = tz.key
        if key is None or len(key) > _ZONE_KEY_MAX or not _ZONE_KEY.fullmatch(key):
            raise SerializationError(f"cannot carry a ZoneInfo without an IANA key (key {key!r})")
        return bytes((_TZ_ZONE,)) + key.encode("ascii")
    raise SerializationError(f"cannot carry a tzinfo of type {_type_name(type(tz))!r}")


def _encode_datetime(obj: datetime) -> object:
    head = _DATETIME.pack(
        obj.year, obj.month, obj.day, obj.hour, obj.minute, obj.second, obj.microsecond, obj.fold
    )
    return _ext(_EXT_DATETIME, head + _encode_tz(obj.tzinfo))


def _encode_date(obj: date) -> object:
    return _ext(_EXT_DATE, _DATE.pack(obj.year, obj.month, obj.day))


def _encode_time(obj: time) -> object:
    head = _TIME.pack(obj.hour, obj.minute, obj.second, obj.microsecond, obj.fold)
    return _ext(_EXT_TIME, head + _encode_tz(obj.tzinfo))


def _encode_timedelta(obj: timedelta) -> object:
    return _ext(_EXT_TIMEDELTA, _TIMEDELTA.pack(obj.days, obj.seconds, obj.microseconds))


def _encode_decimal(obj: Decimal) -> object:
    return _ext(_EXT_DECIMAL, str(obj).encode("ascii"))


def _encode_uuid(obj: UUID) -> object:
    return _ext(_EXT_UUID, obj.bytes)


_BUILTIN_ENCODERS: Final[dict[type, Callable[[Any], object]]] = {
    tuple: _encode_tuple,
    set: _encode_set,
    frozenset: _encode_frozenset,
    int: _encode_int,
    datetime: _encode_datetime,
    date: _encode_date,
    time: _encode_time,
    timedelta: _encode_timedelta,
    Decimal: _encode_decimal,
    UUID: _encode_uuid,
}

# Types that Codec.register refuses: carried already, or written by msgpack itself before any hook is asked.
_NOT_REGISTRABLE: Final[frozenset[type]] = frozenset(
    {type(None), bool, int, float, str, bytes, list, dict, bytearray, memoryview, msgpack.ExtType}
    | {msgpack.Timestamp}
    | _BUILTIN_ENCODERS.keys()
)

# msgpack writes these itself (see the module docstring); refused when they are the whole value.
_REFUSED_AT_TOP: Final[frozenset[type]] = frozenset(
    {bytearray, memoryview, msgpack.ExtType, msgpack.Timestamp}
)


# --- decoders of leaf ext types: data in, object out; any exception means a corrupt payload ----------------


def _decode_int(data: bytes) -> int:
    return int.from_bytes(data, "big", signed=True)


def _decode_tz(data: bytes, start: int) -> timezone | ZoneInfo | None:
    if start == len(data):
        return None
    kind = data[start]
    if kind in (_TZ_OFFSET, _TZ_NAMED_OFFSET):
        (micros,) = _OFFSET.unpack_from(data, start + 1)
        offset = timedelta(microseconds=micros)
        name_start = start + 1 + _OFFSET.size
        if kind == _TZ_OFFSET:
            if name_start != len(data):
                raise ValueError("trailing bytes after a UTC offset")
            return timezone(offset)
        return timezone(offset, data[name_start:].decode())
    if kind == _TZ_ZONE:
        key = data[start + 1 :].decode("ascii")
        if len(key) > _ZONE_KEY_MAX or not _ZONE_KEY.fullmatch(key):
            raise ValueError(f"not an IANA time zone key: {key!r}")
        return ZoneInfo(key)
    raise ValueError(f"unknown tz kind {kind}")


def _decode_datetime(data: bytes) -> datetime:
    year, month, day, hour, minute, second, micro, fold = _DATETIME.unpack_from(data)
    tz = _decode_tz(data, _DATETIME.size)
    return datetime(year, month, day, hour, minute, second, micro, tz, fold=fold)


def _decode_date(data: bytes) -> date:
    return date(*_DATE.unpack(data))


def _decode_time(data: bytes) -> time:
    hour, minute, second, micro, fold = _TIME.unpack_from(data)
    return time(hour, minute, second, micro, _decode_tz(data, _TIME.size), fold=fold)


def _decode_timedelta(data: bytes) -> timedelta:
    return timedelta(*_TIMEDELTA.unpack(data))


def _decode_decimal(data: bytes) -> Decimal:
    return Decimal(data.decode("ascii"))


def _decode_uuid(data: bytes) -> UUID:
    return UUID(bytes=data)


_LEAF_DECODERS: Final[dict[int, Callable[[bytes], object]]] = {
    _EXT_INT: _decode_int,
    _EXT_DATETIME: _decode_datetime,
    _EXT_DATE: _decode_date,
    _EXT_TIME: _decode_time,
    _EXT_TIMEDELTA: _decode_timedelta,
    _EXT_DECIMAL: _decode_decimal,
    _EXT_UUID: _decode_uuid,
}


class _Marker:
    """What a marker ext decodes to; the array it ends is handed to ``build``."""

    __slots__ = ("build",)

    def __init__(self, build: Callable[[list[Any]], object]) -> None:
        self.build = build


_BUILTIN_MARKERS: Final[dict[int, _Marker]] = {
    _EXT_TUPLE: _Marker(tuple),
    _EXT_SET: _Marker(set),
    _EXT_FROZENSET: _Marker(frozenset),
}


class _Decoding:
    """The hooks of one unpack.

    Made per call because it counts markers (every marker must be consumed by the list_hook of the array it
    ends), which hooks built once and shared by threads could not do.
    """

    __slots__ = ("markers", "open")

    def __init__(self, markers: dict[int, _Marker]) -> None:
        self.markers = markers
        self.open = 0  # markers decoded but not yet consumed as the last item of an array

    def ext_hook(self, code: int, data: bytes) -> object:
        marker = self.markers.get(code)
        if marker is not None:
            if data:
                raise ValueError(f"marker ext {code} carries {len(data)} bytes")
            self.open += 1
            return marker
        decode = _LEAF_DECODERS.get(code)
        if decode is None:
            raise ValueError(f"unknown ext code {code}")
        return decode(data)

    def list_hook(self, items: list[Any]) -> object:
        if items and type(items[-1]) is _Marker:
            marker = items.pop()
            self.open -= 1
            return marker.build(items)
        return items


class Codec:
    """Extra types a Group carries, beyond the built-in ones.

    Register every type before the Group is used, identically in every process that shares the group: a
    waiter decodes with its own codec. Types are matched exactly, so register each subclass that is carried::

        codec = mpflight.Codec()
        codec.register(Point, 0, lambda p: (p.x, p.y), lambda xy: Point(*xy))
    """

    __slots__ = ("_default", "_encoders", "_errors", "_markers")

    def __init__(self) -> None:
        self._encoders: dict[type, Callable[[Any], object]] = dict(_BUILTIN_ENCODERS)
        self._markers: dict[int, _Marker] = dict(_BUILTIN_MARKERS)
        self._errors: dict[str, type[BaseException]] = {}  # 'module.QualName' -> a registered exception type
        # msgpack calls this for every object it cannot write itself; bound once, not per pack.
        self._default: Callable[[object], object] = self._encode

    def copy(self) -> Codec:
        """A codec that carries what this one carries; registering on it leaves this one as it is."""
        other = Codec()
        other._encoders, other._markers, other._errors = (
            dict(self._encoders),
            dict(self._markers),
            dict(self._errors),
        )
        return other

    def register_error(self, type_: type[BaseException]) -> None:
        """Let exceptions of exactly ``type_`` (an Exception subclass) travel as themselves.

        A waiter rebuilds one as its own ``type_``, found by module and qualified name among the types
        it registered (nothing is imported), with the owner's ``args`` and the attributes the codec can
        carry (``__notes__`` included), without calling ``__init__``. Register the same types in every
        process. Raises TypeError for what is not an Exception subclass, ValueError when another type
        of that name is registered already.
        """
        if not isinstance(type_, type) or not issubclass(type_, Exception):
            raise TypeError(f"errors must be Exception subclasses, not {type_!r}")
        name = _qualified(str(type_.__module__), type_.__qualname__)
        if "<locals>" in type_.__qualname__:
            raise ValueError(f"{name!r} is defined inside a function: another process cannot name it")
        known = self._errors.get(name)
        if known is not None and known is not type_:
            raise ValueError(f"another exception type named {name!r} is registered already")
        self._errors[name] = type_

    def register(
        self,
        type_: type,
        code: int,
        encode: Callable[[Any], object],
        decode: Callable[[Any], object],
    ) -> None:
        """Carry values of exactly ``type_`` as ``encode(obj)``, rebuilt by ``decode`` under ``code`` (0..63).

        ``encode`` may return any value the codec carries, registered types included; ``decode`` receives that
        value (as the codec rebuilt it) and returns the object. Raises TypeError or ValueError when ``type_``
        is not a class, is carried already (built in or registered), or ``code`` is out of range or taken.
        """
        if not isinstance(type_, type):
            raise TypeError(f"type_ must be a class, not {type(type_).__name__} {type_!r}")
        if type(code) is not int:
            raise TypeError(f"code must be an int, not {type(code).__name__}")
        if not 0 <= code < _REGISTERED_CODES:
            raise ValueError(f"code must be in 0..{_REGISTERED_CODES - 1}, not {code}")
        if not callable(encode) or not callable(decode):
            raise TypeError("encode and decode must be callable")
        name = _type_name(type_)
        if type_ in _NOT_REGISTRABLE:
            raise ValueError(f"{name!r} is written by mpflight or msgpack itself and cannot be registered")
        if type_ in self._encoders:
            raise ValueError(f"{name!r} is registered already")
        ext_code = _EXT_REGISTERED + code
        if ext_code in self._markers:
            raise ValueError(f"code {code} is registered already")
        self._encoders[type_] = _registered_encoder(encode, _marker_ext(ext_code), name)
        self._markers[ext_code] = _Marker(_registered_builder(decode, name))

    def _encode(self, obj: object) -> object:
        encode = self._encoders.get(type(obj))
        if encode is None:
            raise _not_carried(obj)
        return encode(obj)


def _registered_encoder(
    encode: Callable[[Any], object], marker: object, name: str
) -> Callable[[Any], object]:
    def encode_registered(obj: object) -> object:
        try:
            parts = encode(obj)
        except Exception as exc:
            raise SerializationError(f"the registered encode for {name!r} raised {_describe(exc)}") from exc
        return [parts, marker]

    return encode_registered


def _registered_builder(decode: Callable[[Any], object], name: str) -> Callable[[list[Any]], object]:
    def build(items: list[Any]) -> object:
        if len(items) != 1:
            raise ValueError(f"a {name!r} has {len(items)} parts, not 1")
        try:
            return decode(items[0])
        except Exception as exc:
            raise ValueError(f"the registered decode for {name!r} raised {_describe(exc)}") from exc

    return build


_PLAIN: Final = Codec()  # the codec of a Group that registers nothing


# --- packing -----------------------------------------------------------------------------------------------


def _pack_frame(tag: int, body: object, codec: Codec) -> bytes:
    packer = msgpack.Packer(default=codec._default, strict_types=True, buf_size=_PACK_BUFFER)
    return cast(bytes, packer.pack([tag, body]))


def pack_value(value: object, codec: Codec | None) -> bytes:
    """Pack fn's return value; raises SerializationError naming what cannot be carried."""
    kind = type(value)
    if kind is bytes:
        data = cast(bytes, value)
        if len(data) > _BIN32_MAX:
            raise SerializationError(f"cannot carry {len(data)} bytes (msgpack's limit is {_BIN32_MAX})")
        return b"".join((_BYTES_FRAME.pack(_FRAME, VALUE, 0xC6, len(data)), data))
    if kind in _REFUSED_AT_TOP:
        raise _not_carried(value)
    try:
        return _pack_frame(VALUE, value, _PLAIN if codec is None else codec)
    except SerializationError:
        raise
    except Exception as exc:  # msgpack: nesting limit, a str that is not UTF-8, a size over 4 GiB
        raise SerializationError(f"cannot carry the value: {_describe(exc)}") from exc


def pack_key(value: object, codec: Codec | None) -> bytes:
    """Canonical bytes of ``value``, for keys made of arguments: values equal by type and content,
    dicts and sets in any order, give equal bytes, and unequal ones different bytes.

    Every node is tagged with its container type, so the mapping is one to one; dict items and set
    members are sorted by their own canonical bytes. Raises SerializationError for a value the codec
    cannot carry (a key must be made of what can cross processes).
    """
    try:
        return pack_value(_canonical(value, codec), codec)
    except RecursionError:
        raise SerializationError("cannot make a key of a value nested this deep") from None


def _canonical(value: object, codec: Codec | None) -> object:
    kind = type(value)
    if kind is dict:
        items = cast(dict[object, object], value).items()
        return ("d", tuple(sorted((pack_key(k, codec), _canonical(v, codec)) for k, v in items)))
    if kind is set or kind is frozenset:
        members = cast(set[object], value)
        return ("s" if kind is set else "f", tuple(sorted(pack_key(m, codec) for m in members)))
    if kind is list or kind is tuple:
        return ("l" if kind is list else "t", tuple(_canonical(m, codec) for m in cast(list[object], value)))
    return ("v", value)


def _clean(text: str) -> str:
    """Return ``text`` as valid UTF-8 (a str with lone surrogates cannot be packed)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode(errors="backslashreplace").decode()
    return text


def _error_args(exc: BaseException, rebuildable: bool) -> list[object] | None:
    """The args the exception can be rebuilt from, or None when they cannot be read."""
    try:
        if rebuildable:
            # __reduce__ gives the constructor's arguments where args does not: OSError's filename,
            # mpflight's errors (whose args are their message only).
            reduced = exc.__reduce__()
            if type(reduced) is tuple and len(reduced) >= 2 and type(reduced[1]) is tuple:
                return list(reduced[1])
        return list(exc.args)
    except Exception:
        return None


def _reduced_state(exc: BaseException) -> dict[str, object]:
    """What ``__reduce__`` keeps of the exception beside its args and ``vars()``: ImportError's name and
    path, which live in C."""
    try:
        reduced = exc.__reduce__()
    except Exception:
        return {}
    if type(reduced) is tuple and len(reduced) >= 3 and type(reduced[2]) is dict:
        return {k: v for k, v in reduced[2].items() if type(k) is str}
    return {}


def _str_of(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return "<exception str() failed>"


def _traceback_text(exc: BaseException, qualname: str, message: str) -> str:
    try:
        return "".join(traceback.format_exception(exc))
    except Exception:
        return f"{qualname}: {message}\n(mpflight could not format the traceback)\n"


def _attrs(exc: BaseException, codec: Codec) -> dict[str, object] | None:
    """The exception's instance attributes that the codec can carry (``__notes__`` among them)."""
    try:
        state = _reduced_state(exc) | dict(vars(exc))
    except Exception:
        return None
    kept: dict[str, object] = {}
    for name, value in state.items():
        if type(name) is not str:
            continue
        try:
            _pack_frame(VALUE, value, codec)
        except Exception:  # noqa: S112 (an attribute that cannot travel is left behind, the rest go)
            continue
        kept[name] = value
    return kept or None


def pack_error(exc: BaseException, codec: Codec | None) -> bytes:
    """Pack the exception fn raised: its type's name, args and attributes (what of them can be carried),
    message, traceback; and, for a type registered with ``Codec.register``, the exception itself.

    Never raises.
    """
    use = _PLAIN if codec is None else codec
    try:
        cls = type(exc)
        module = _clean(str(getattr(cls, "__module__", "")))
        qualname = _clean(str(cls.__qualname__))
        message = _clean(_str_of(exc))
        tb = _clean(_traceback_text(exc, qualname, message))
        args = _error_args(exc, _rebuildable(module, qualname) is cls or cls in use._errors.values())
        attrs = _attrs(exc, use)
        whole = exc if cls in use._encoders else None
    except Exception:
        return _ERROR_FALLBACK
    for body in (
        [module, qualname, args, message, tb, attrs, whole],
        [module, qualname, args, message, tb, attrs, None],
        [module, qualname, args, message, tb, None, None],
    ):
        if body[2] is None and body[5] is None and body[6] is None:
            break
        try:
            return _pack_frame(ERROR, body, use)
        except Exception:  # noqa: S112 (what cannot be carried is left out: send the rest without it)
            continue
    try:
        return _pack_frame(ERROR, [module, qualname, None, message, tb, None, None], _PLAIN)
    except Exception:
        return _ERROR_FALLBACK


# The last resort of pack_error (say, MemoryError while packing): waiters get a RemoteError that says so.
_ERROR_FALLBACK: Final = _pack_frame(
    ERROR, ["", "<exception>", None, "mpflight could not pack the owner's exception", "", None, None], _PLAIN
)


def is_fns(payload: bytes) -> bool:
    """Whether the payload carries fn's own outcome (its value or its exception), not an abort or
    what could not be carried."""
    return _tag(payload) in (VALUE, ERROR)


def pack_abort(reason: str) -> bytes:
    """Pack an abort: the call ended without an outcome, for ``reason``."""
    return _pack_frame(ABORT, _clean(reason), _PLAIN)


def pack_not_carried(message: str) -> bytes:
    """Pack the SerializationError the owner met packing fn's value, for the waiters to raise too."""
    return _pack_frame(NOT_CARRIED, _clean(message), _PLAIN)


# --- unpacking ---------------------------------------------------------------------------------------------

# mpflight's own errors, rebuilt by name like built-in exceptions. Keyed by qualname and checked against the
# class's __module__ at lookup time, so that both sides agree even if the package re-homes them.
_OWN_ERRORS: Final[dict[str, type[BaseException]]] = {
    cls.__qualname__: cls
    for cls in (
        MPFlightError, AbortError, SerializationError, RemoteError, DeadlockError, RemoteTraceback,
        IncompatibleTable, DamagedTable, CorruptSlot, AccessDenied, NoSpace, SegmentFull, NoSuchTable,
        NotInitialised, CorruptPayload, TierUnavailable, WaitTimeout,
    )
}  # fmt: skip


def _rebuildable(module: str, qualname: str) -> type[BaseException] | None:
    """The class named, when it is one unpack may rebuild: a built-in exception or an mpflight error.

    Only Exception subclasses: a payload naming SystemExit, KeyboardInterrupt or GeneratorExit (which only
    a damaged or hostile payload can) must not escape a waiter's ``except Exception``.
    """
    found = vars(builtins).get(qualname) if module == "builtins" else _OWN_ERRORS.get(qualname)
    if (
        isinstance(found, type)
        and issubclass(found, Exception)
        and found.__module__ == module
        and found.__qualname__ == qualname
    ):
        return found
    return None


_ErrorFields = tuple[str, str, list[Any] | None, str, str, dict[str, Any] | None, object]


def _error_fields(body: object) -> _ErrorFields:
    if type(body) is not list or len(body) != 7:
        raise ValueError("an error is not a list of 7 fields")
    module, qualname, args, message, tb, attrs, whole = body
    if not (
        type(module) is str
        and type(qualname) is str
        and (args is None or type(args) is list)
        and type(message) is str
        and type(tb) is str
        and (attrs is None or (type(attrs) is dict and all(type(k) is str for k in attrs)))
    ):
        raise ValueError("an error's fields have the wrong types")
    return module, qualname, args, message, tb, attrs, whole


def _tag(frame: bytes | memoryview) -> int:
    if len(frame) <= _HEADER_SIZE or frame[0] != _FRAME:
        raise ValueError("no [tag, body] header")
    tag = frame[1]
    if tag > NOT_CARRIED:
        raise ValueError(f"unknown tag {tag}")
    return tag


def _decode(payload: bytes | memoryview, codec: Codec) -> tuple[int, object]:
    """Decode and check a payload: (tag, body), where an ERROR's body is its _ErrorFields.

    Every view this makes of a memoryview ``payload`` is released before it returns or raises, so that the
    caller can close or reuse the memory beneath even while an exception raised here is alive.
    """
    hooks = _Decoding(codec._markers)
    # unpackb bounds every length the body declares by the body's own length: nothing read here allocates
    # more than the payload's size.
    if type(payload) is bytes:
        tag = _tag(payload)
        # Copying a small body costs less than viewing it. A view of bytes need not be released: bytes
        # cannot be resized or closed under it.
        rest = payload[_HEADER_SIZE:] if len(payload) <= _COPY_MAX else memoryview(payload)[_HEADER_SIZE:]
        body = msgpack.unpackb(rest, ext_hook=hooks.ext_hook, list_hook=hooks.list_hook, strict_map_key=False)
    else:
        with memoryview(payload) as view:
            if view.format != "B" or view.ndim != 1:
                raise ValueError(f"expected a buffer of bytes, not format {view.format!r}")
            tag = _tag(view)
            with view[_HEADER_SIZE:] as rest:
                body = msgpack.unpackb(
                    rest, ext_hook=hooks.ext_hook, list_hook=hooks.list_hook, strict_map_key=False
                )
    if hooks.open:
        raise ValueError(f"{hooks.open} marker(s) not at the end of an array")
    if tag == VALUE:
        return tag, body
    if tag == ERROR:
        return tag, _error_fields(body)
    if type(body) is not str:
        raise ValueError(f"tag {tag} with a body of type {type(body).__name__}, not str")
    return tag, body


def _restore(exc: BaseException, attrs: dict[str, Any] | None) -> None:
    """Give a rebuilt exception the owner's attributes (those that travelled)."""
    if not attrs:
        return
    for name, value in attrs.items():
        if name == "__notes__" and type(value) is not list:
            continue
        with contextlib.suppress(Exception):  # a read-only attribute, a property that refuses
            setattr(exc, name, value)


def _registered(cls: type[BaseException], args: list[Any] | None) -> BaseException | None:
    """An exception of a registered type, made as unpickling would, without calling its own
    ``__init__``; the built-in exception it derives from is initialised with the owner's args, so
    that fields a built-in keeps in C (UnicodeError's, StopIteration's value) are set as they were."""
    builtin: Any = next(c for c in cls.__mro__ if c.__module__ == "builtins")
    try:
        exc = cls.__new__(cls, *(args or ()))
        with contextlib.suppress(Exception):  # args the built-in does not take: it keeps them as args
            builtin.__init__(exc, *(args or ()))
        exc.args = tuple(args or ())
    except Exception:
        return None
    return exc if type(exc) is cls else None


def _rebuild(fields: _ErrorFields, codec: Codec, key: str | bytes, owner_pid: int) -> BaseException:
    module, qualname, args, message, tb, attrs, whole = fields
    exc: BaseException | None = None
    name = _qualified(module, qualname)
    if isinstance(whole, Exception) and _type_name(type(whole)) == name:
        exc = whole  # its type is registered with Codec.register: the codec rebuilt it
    elif name in codec._errors:
        exc = _registered(codec._errors[name], args)
        if exc is not None:
            _restore(exc, attrs)
    else:
        cls = _rebuildable(module, qualname)
        if cls is not None and args is not None:
            try:
                exc = cls(*args)
            except Exception:
                exc = None
            if type(exc) is not cls:  # e.g. OSError(errno, ...) makes a subclass: not what the owner raised
                exc = None
            if exc is not None:
                _restore(exc, attrs)
    if exc is None:
        exc = RemoteError(name, message, tb)
        if name not in codec._errors and _rebuildable(module, qualname) is None:
            exc.add_note(
                f"{name} is not registered to travel between processes: register it in every process, "
                f"with Group(..., errors=[{name}]) or Codec.register_error, to get it as itself"
            )
    exc.__cause__ = RemoteTraceback(tb)
    # The note repeats the owner's traceback: code that reports an exception with its notes but not its
    # cause (a log line, a test runner's summary) still shows where fn raised.
    exc.add_note(f"raised in the owner process (pid {owner_pid}) of the call for key {short_key(key)}:\n{tb}")
    return exc


def unpack(payload: bytes | memoryview, codec: Codec | None, *, key: str | bytes, owner_pid: int) -> object:
    """Return the value a payload carries, or raise the outcome it carries instead.

    ERROR raises fn's exception (rebuilt when its type is a built-in exception or an mpflight error, else
    RemoteError), with the owner's traceback as a RemoteTraceback ``__cause__`` and in a note; ABORT raises
    AbortError; NOT_CARRIED raises SerializationError. A payload that does not decode raises MPFlightError
    and nothing else.
    """
    use = _PLAIN if codec is None else codec
    try:
        tag, body = _decode(payload, use)
    except Exception as exc:  # whatever a corrupt payload makes msgpack, a struct or a constructor raise
        raise CorruptPayload(_describe(exc)) from exc
    if tag == VALUE:
        return body
    if tag == ERROR:
        raise _rebuild(cast(_ErrorFields, body), use, key, owner_pid)
    if tag == ABORT:
        raise AbortError(key, owner_pid, cast(str, body))
    raise SerializationError(cast(str, body))
