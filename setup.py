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

from setuptools import setup

# The modules every request runs through (and what they import on that path).
COMPILED = [
    "proxy/exchange.py",
    "proxy/http1.py",
    "proxy/upstream.py",
    "proxy/dispatch.py",
    "proxy/runtime.py",
    "proxy/affinity.py",
    "proxy/hashing.py",
    "proxy/retry.py",
    "proxy/metrics.py",
    "proxy/accesslog.py",
]


def ext_modules() -> list[object]:
    if os.environ.get("STICKY_PROXY_PURE", "") not in ("", "0"):
        return []
    from mypyc.build import mypycify

    return list(mypycify(COMPILED, opt_level="3", group_name="proxy"))


setup(ext_modules=ext_modules())
