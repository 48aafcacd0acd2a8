"""Access log: one line per request with Envoy's default fields, never blocking the loop.

Format
------
``text`` is Envoy's default format (what ``istioctl``/Istio users read every day)::

    [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
    %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%
    "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%"
    "%UPSTREAM_HOST%"

e.g. ``[2026-11-26T13:01:02.345Z] "GET /cart HTTP/1.1" 200 - 0 41 3 - "-" "curl/8.5" "5d1f..."
"test.com" "127.0.0.1:9001"``. Missing values are ``-``; the upstream service time is always
``-`` (no upstream timing yet). ``json`` is one object per line with Istio's JSON keys
(``start_time``, ``method``, ``path``, ``protocol``, ``response_code``, ``response_flags``,
``bytes_received``, ``bytes_sent``, ``duration``, ``upstream_service_time``,
``x_forwarded_for``, ``user_agent``, ``request_id``, ``authority``, ``upstream_host``,
``requested_server_name``), plus ``downstream_tls_version`` (Envoy's %DOWNSTREAM_TLS_VERSION%,
``TLSv1.3``): both null on plain HTTP.

Why a thread
------------
Writing to stdout can block: a pipe whose reader is slow (``kubectl logs``, a log shipper) fills
up, and a blocking ``write`` on the event loop would stall every connection. Lines are formatted
on the loop into a list; every ``BATCH`` lines or ``INTERVAL`` seconds the list is joined and
handed to one writer thread through a bounded queue. When the writer falls ``MAX_BATCHES`` behind,
batches are dropped and counted (``dropped``), never waited for: losing log lines beats losing
requests. (``logging.handlers.QueueHandler`` does the same hand-off but builds a LogRecord per
line, several microseconds we do not need to spend.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, Final, TextIO

if TYPE_CHECKING:
    from proxy.exchange import Exchange

FORMATS: Final = ("off", "text", "json")
BATCH: Final = 256
INTERVAL: Final = 0.5
MAX_BATCHES: Final = 256


_PROTOCOLS: Final = {b"1.1": "HTTP/1.1", b"1.0": "HTTP/1.0"}
# Text of the numbers most lines carry (statuses, milliseconds, small sizes): formatting an int
# costs more than a few fields' worth of the rest of the line.
_NUMBERS: Final = tuple(str(i) for i in range(1024))
_quote: Final = json.encoder.encode_basestring_ascii  # C, ~0.1 us


def _xff_and_agent(ex: Exchange) -> tuple[str | None, str | None]:
    """X-Forwarded-For and User-Agent as received (one pass over the headers)."""
    xff = agent = None
    for key, value in ex.headers:
        if key == b"user-agent":
            agent = value.decode("latin-1")
        elif key == b"x-forwarded-for":
            xff = value.decode("latin-1")
    return xff, agent


def _number(n: int) -> str:
    return _NUMBERS[n] if 0 <= n < 1024 else str(n)


def _json_text(value: str | None) -> str:
    return "null" if value is None else _quote(value)


class AccessLog:
    """Formats finished exchanges and writes them from a thread (see the module docstring)."""

    def __init__(self, fmt: str = "text", stream: TextIO | None = None) -> None:
        if fmt not in ("text", "json"):
            raise ValueError(f"access log format must be text or json, not {fmt!r}")
        self.json = fmt == "json"
        self.stream = stream if stream is not None else sys.stdout
        self.dropped = 0  # batches the writer could not keep up with
        self._lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue(MAX_BATCHES)
        # Not "_thread": compiled (setup.py), mypyc would name it __thread in C, a GCC keyword.
        self._writer = threading.Thread(target=self._write, name="access-log", daemon=True)
        self._writer.start()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._offset = 0.0  # wall clock - loop clock
        self._second = -1
        self._seconds = ""
        self._ms = -1
        self._stamp = ""

    # ------------------------------------------------------------------ request path
    def log(self, ex: Exchange) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self._offset = time.time() - loop.time()
        self._lines.append(self._json(ex) if self.json else self._text(ex))
        if len(self._lines) >= BATCH:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(INTERVAL, self.flush)

    def _start_time(self, ex: Exchange) -> str:
        """Envoy's %START_TIME%: 2026-11-26T13:01:02.345Z (cached per millisecond)."""
        ms = int((ex.start + self._offset) * 1000)
        if ms != self._ms:
            second, rest = divmod(ms, 1000)
            if second != self._second:
                self._second = second
                self._seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._ms = ms
            self._stamp = f"{self._seconds}.{rest:03d}Z"
        return self._stamp

    def _text(self, ex: Exchange) -> str:
        xff, agent = _xff_and_agent(ex)
        return (
            f'[{self._start_time(ex)}] "{ex.method.decode("latin-1") or "-"} '
            f'{ex.target.decode("latin-1") or "-"} {_PROTOCOLS.get(ex.version, "-")}" '
            f"{_number(ex.status)} {ex.flags} {_number(ex.bytes_received)} "
            f"{_number(ex.bytes_sent)} {_number(int((ex.end - ex.start) * 1000))} - "
            f'"{xff or "-"}" "{agent or "-"}" "{ex.request_id.decode("latin-1") or "-"}" '
            f'"{ex.authority.decode("latin-1") if ex.authority else "-"}" '
            f'"{ex.upstream or "-"}"\n'
        )

    def _json(self, ex: Exchange) -> str:
        # By hand rather than json.dumps(dict): a third of the cost, same output.
        xff, agent = _xff_and_agent(ex)
        method = ex.method.decode("latin-1") or None
        path = ex.target.decode("latin-1") or None
        rid = ex.request_id.decode("latin-1") or None
        authority = ex.authority.decode("latin-1") if ex.authority else None
        tls = ex.tls
        return (
            f'{{"start_time":"{self._start_time(ex)}","method":{_json_text(method)},'
            f'"path":{_json_text(path)},"protocol":"{_PROTOCOLS.get(ex.version, "-")}",'
            f'"response_code":{_number(ex.status)},"response_flags":"{ex.flags}",'
            f'"bytes_received":{_number(ex.bytes_received)},'
            f'"bytes_sent":{_number(ex.bytes_sent)},'
            f'"duration":{_number(int((ex.end - ex.start) * 1000))},"upstream_service_time":null,'
            f'"x_forwarded_for":{_json_text(xff)},"user_agent":{_json_text(agent)},'
            f'"request_id":{_json_text(rid)},"authority":{_json_text(authority)},'
            f'"upstream_host":{_json_text(ex.upstream)},'
            f'"requested_server_name":{_json_text(tls.sni if tls is not None else None)},'
            f'"downstream_tls_version":{_json_text(tls.version if tls is not None else None)}}}\n'
        )

    # ------------------------------------------------------------------ hand-off
    def flush(self) -> None:
        """Hand the buffered lines to the writer thread (drops them when it is far behind)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is not None:
            self._offset = time.time() - self._loop.time()  # follow wall-clock steps
        if not self._lines:
            return
        chunk = "".join(self._lines)
        self._lines.clear()
        try:
            self._queue.put_nowait(chunk)
        except queue.Full:
            self.dropped += 1

    def _write(self) -> None:
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            with contextlib.suppress(OSError, ValueError):
                self.stream.write(chunk)
                self.stream.flush()

    def close(self, timeout: float = 2.0) -> None:
        """Flush what is buffered and stop the writer (waits at most ``timeout`` seconds)."""
        self.flush()
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._writer.join(timeout)
