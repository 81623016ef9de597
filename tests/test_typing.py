"""A type checker infers each call's return type from fn; the examples pass mypy --strict."""

from __future__ import annotations

import pytest

from tests.helpers import ROOT

api = pytest.importorskip("mypy.api", reason="mypy is in the test extra")


def test_return_types_follow_fn() -> None:
    out, err, status = api.run(["--strict", "--warn-unused-ignores", str(ROOT / "tests" / "typing_check.py")])
    assert status == 0, out + err


def test_examples_pass_strict_mypy() -> None:
    out, err, status = api.run(["--strict", str(ROOT / "examples")])
    assert status == 0, out + err
