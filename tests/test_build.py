"""The build under test is the one that ships: compiled request path unless asked otherwise."""

from __future__ import annotations

import importlib
import os
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PURE = os.environ.get("STICKY_PROXY_PURE", "") not in ("", "0")


def compiled_modules() -> list[str]:
    """pyproject.toml's [tool.sticky-proxy] compiled list (what setup.py and make read)."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        paths = tomllib.load(f)["tool"]["sticky-proxy"]["compiled"]
    return [path.removeprefix("proxy/").removesuffix(".py") for path in paths]


def test_setup_compiles_the_request_path() -> None:
    assert {"exchange", "http1", "upstream", "dispatch", "affinity", "metrics"} <= set(
        compiled_modules()
    )


@pytest.mark.skipif(PURE, reason="STICKY_PROXY_PURE=1: the interpreted build is under test")
@pytest.mark.parametrize("name", compiled_modules())
def test_request_path_modules_are_the_compiled_ones(name: str) -> None:
    module = importlib.import_module(f"proxy.{name}")
    assert module.__file__ is not None and module.__file__.endswith(".so"), (
        f"proxy.{name} is interpreted ({module.__file__}): run `make unit` to compile it"
    )


@pytest.mark.skipif(not PURE, reason="the compiled build is under test")
def test_pure_build_has_no_extensions() -> None:
    assert not list((ROOT / "proxy").glob("*.so"))
