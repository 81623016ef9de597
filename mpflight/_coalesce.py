"""The decorator: concurrent calls of a function with equal arguments share one execution."""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from . import _codec
from ._errors import SerializationError
from ._table import MAX_KEY_BYTES

if TYPE_CHECKING:
    from ._group import Group

P = ParamSpec("P")
R = TypeVar("R")


def decorator(
    group: Callable[[], Group], key: Callable[..., str | bytes] | None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """The decorator of ``Group.coalesce`` and ``mpflight.coalesce``, on the group ``group()`` gives."""

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(func)
        prefix = f"{func.__module__}.{func.__qualname__}".encode()

        def make_key(args: tuple[object, ...], kwargs: dict[str, object]) -> str | bytes:
            if key is not None:  # the function's identity stays part of the key
                made_by_key = key(*args, **kwargs)
                if not isinstance(made_by_key, str | bytes):
                    raise TypeError(f"key= must return str or bytes, not {type(made_by_key).__name__}")
                tail = (
                    made_by_key.encode("utf-8", "surrogatepass")
                    if isinstance(made_by_key, str)
                    else made_by_key
                )
                return prefix + (b"\1" if isinstance(made_by_key, str) else b"\2") + tail
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            codec = group().codec
            parts = [prefix]
            for name, value in bound.arguments.items():
                try:
                    parts.append(_codec.pack_key((name, value), codec))
                except SerializationError as e:
                    raise TypeError(
                        f"cannot make a key of argument {name!r} of {func.__qualname__}: {e}; pass key="
                    ) from None
            made = b"\0".join(parts)
            # Past the key length limit, the digest stands for it (slots keep a digest anyway).
            return made if len(made) <= MAX_KEY_BYTES else prefix + b"\0" + hashlib.sha256(made).digest()

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def coalesced_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await group().do_async(make_key(args, kwargs), func, *args, **kwargs)

            return coalesced_async  # type: ignore[return-value]

        @functools.wraps(func)
        def coalesced(*args: P.args, **kwargs: P.kwargs) -> R:
            return group().do(make_key(args, kwargs), func, *args, **kwargs)

        return coalesced

    return decorate
