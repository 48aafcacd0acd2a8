"""Build hook: compile the request-path modules to C extensions with mypyc.

The request path is interpreted Python spread over many small calls; mypyc turns those modules
into C (native classes, direct calls, unboxed ints) from the same type-checked source, which
roughly halves the CPU the proxy spends per request on top of the kernel's share. Everything
else (config loading, the CLI, admin pages) stays interpreted: it is not on the request path
and is easier to debug that way.

``STICKY_PROXY_PURE=1`` builds a pure-Python package instead (no C compiler needed; same
behaviour, about 1.5x the CPU per request). The modules and their .py sources are the same
either way; an installed extension takes precedence over the .py file of the same name.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from setuptools import setup

# The modules every request runs through (and what they import on that path): pyproject.toml's
# [tool.sticky-proxy] compiled list, which the Makefile reads too.
PYPROJECT = Path(__file__).resolve().parent / "pyproject.toml"
COMPILED: list[str] = tomllib.loads(PYPROJECT.read_text())["tool"]["sticky-proxy"]["compiled"]


def ext_modules() -> list[object]:
    if os.environ.get("STICKY_PROXY_PURE", "") not in ("", "0"):
        return []
    from mypyc.build import mypycify

    return list(mypycify(COMPILED, opt_level="3", group_name="proxy"))


setup(ext_modules=ext_modules())
