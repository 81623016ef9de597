"""Checked by mypy in tests/test_typing.py, never run: the return type follows fn."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import assert_type

import mpflight

group = mpflight.Group("typing")


def number(x: int, *, scale: float = 1.0) -> float:
    return x * scale


async def text(x: int) -> str:
    await asyncio.sleep(0)
    return str(x)


assert_type(group.do("k", number, 2, scale=3.0), float)
assert_type(group.do_ex("k", number, 2), mpflight.Result[float])
assert_type(group.do_ex("k", number, 2).value, float)
assert_type(group.do_future("k", number, 2), Future[mpflight.Result[float]])


async def use() -> None:
    assert_type(await group.do_async("k", text, 1), str)
    assert_type(await group.do_async("k", number, 1), float)


@group.coalesce()
def decorated(x: int) -> list[int]:
    return [x]


@mpflight.coalesce("typing")
async def decorated_async(x: int) -> bytes:
    return b""


assert_type(decorated(1), list[int])


async def use_async() -> None:
    assert_type(await decorated_async(1), bytes)


group.do("k", number, "not an int")  # type: ignore[arg-type]
