"""The two texts of a route explanation: ``sticky-proxy route``'s lines and the admin's JSON.

``proxy.explain`` decides; this module only writes what it decided, so the CLI and the admin
``/route`` say the same things in their two forms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy.affinity import (
    CookiePolicy,
    HashPolicy,
    HeaderPolicy,
    QueryParameterPolicy,
    set_cookie_value,
)
from proxy.config import DnsEndpoints
from proxy.exchange import HeaderEdit

if TYPE_CHECKING:
    from proxy.explain import Explanation, SessionNote

Address = tuple[str, int]


# --------------------------------------------------------------------------- the CLI's text
def lines(ex: Explanation) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    add = out.append
    if ex.listener is not None:
        gateways = ", ".join(ex.listener.gateways)
        add(("listener", f"{ex.listener.bind}:{ex.port} (Gateway {gateways})"))
    add(("request", ex.request))
    add(("connection", f"client {_fmt(ex.probe.client)} -> proxy {_fmt(ex.local)}"))
    decision = ex.decision
    if decision is None:
        vhosts = ", ".join(ex.vhosts) or "none"
        add(("route", f"none: the proxy answers 404 (no route; virtual hosts: {vhosts})"))
        return out
    action = decision.action
    add(("virtual host", decision.vhost))
    if action.virtual_service:
        add(("VirtualService", f"{action.virtual_service} ({ex.source})"))
        match = f" match[{action.match_index}]" if action.match_index is not None else ""
        name = f" name {action.route_name!r}" if action.route_name else ""
        add(("route", f"http[{action.route_index}]{match}{name}"))
    reply = decision.local_reply
    if reply is not None:
        what = "redirect" if action.redirect is not None else "direct response"
        extra = f" -> {decision.location}" if decision.location else ""
        body = f" body {reply.body[:60]!r}" if reply.body else ""
        add(("reply", f"{what} {reply.status}{extra}{body}"))
        return out
    method = ex.probe.method
    host = (decision.authority or ex.probe.host.encode()).decode("latin-1")
    if ex.split is not None:
        add(("weighted pick", ex.split))
    add(("cluster", decision.cluster or ""))
    add(("upstream", f"{method} {decision.path} (Host: {host})"))
    edits = _edits(decision.request_headers)
    if edits:
        add(("headers", edits))
    add(("timeout", f"{decision.timeout:g}s" if decision.timeout is not None else "none"))
    retries = decision.retries
    add(
        (
            "retries",
            f"{retries.attempts} on {','.join(retries.retry_on)}"
            if retries is not None
            else "disabled",
        )
    )
    view = ex.cluster
    if view is None:
        add(("endpoints", "none: the cluster does not exist (the proxy answers 503)"))
        return out
    lb = view.spec.lb
    add(("load balancer", lb.describe))
    affinity = action.affinity
    if affinity is not None:
        add(("hash policy", "; ".join(_policy(p) for p in affinity.policies)))
        add(("hash key", ex.hash_key or "none: no policy found its key, the pick is random"))
        policy = affinity.cookie_policy
        if ex.set_cookie is not None:
            add(("set-cookie", ex.set_cookie))
        elif policy is not None:
            reason = "the request carries it" if policy.ttl is not None else "no ttl: read only"
            add(("set-cookie", f"none ({reason})"))
    else:
        add(("hash policy", "none"))
    note = ex.session
    if note is not None:
        add(("session", note.persistent.describe()))
        add(("session value", note.value_text()))
        add(("session pod", note.pod_text()))
        if note.set_value is not None:
            add(("session cookie", _session_line(note)))
        if note.routed:
            add(("endpoint", note.address))
            return out
        if note.strict_reply:
            add(("endpoint", "none: the proxy answers 503 no healthy upstream"))
            return out
    if ex.bounded is not None:
        add(("bounded load", ex.bounded))
    spec_endpoints = view.spec.endpoints
    if view.endpoints is None:
        targets = spec_endpoints.targets if isinstance(spec_endpoints, DnsEndpoints) else ()
        names = " ".join(t.key for t in targets) or "none"
        add(("endpoints", f"DNS {names} (resolved at run time; no endpoint picked)"))
        return out
    if view.balancer is None:
        add(("endpoints", "none: the proxy answers 503 no healthy upstream"))
        return out
    add(
        (
            "endpoints",
            " ".join(
                ep.key + (f" (weight {ep.weight})" if ep.weight != 1 else "")
                for ep in view.endpoints
            ),
        )
    )
    if lb.consistent_hash is None:
        add(("endpoint", f"chosen per request by {lb.describe} (not by a hash)"))
    elif ex.endpoint is None:
        add(("endpoint", "random (no hash key)"))
    else:
        add(("endpoint", ex.endpoint))
    return out


def _session_line(note: SessionNote) -> str:
    """The response line that names the new pod: Set-Cookie text, or the header."""
    persistent = note.persistent
    value = note.set_value
    if persistent.cookie:
        spec = persistent.spec
        policy = CookiePolicy(spec.name, path=spec.path, ttl=persistent.ttl)
        return set_cookie_value(policy, value or "")
    return f"{persistent.name}: {value}"


def _policy(policy: HashPolicy) -> str:
    if isinstance(policy, CookiePolicy):
        parts = [f"cookie {policy.name}"]
        parts.append(f"ttl {policy.ttl}s" if policy.ttl is not None else "no ttl (read only)")
        if policy.path:
            parts.append(f"path {policy.path}")
        parts.extend(f"{a.name}={a.value}" if a.value else a.name for a in policy.attributes)
        return ", ".join(parts)
    if isinstance(policy, HeaderPolicy):
        return f"header {policy.name}"
    if isinstance(policy, QueryParameterPolicy):
        return f"query parameter {policy.name}"
    return "source IP"


def _edits(edit: HeaderEdit | None) -> str:
    if edit is None:
        return ""
    parts = [f"-{n.decode()}" for n in sorted(edit.remove)]
    parts += [f"{n.decode()}={v.decode()}" for n, v in edit.set]
    parts += [f"+{n.decode()}={v.decode()}" for n, v in edit.add]
    return " ".join(parts)


def _fmt(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- the admin's JSON
def as_json(ex: Explanation) -> tuple[int, dict[str, Any]]:
    answer: dict[str, Any] = {"port": ex.port, "request": ex.request}
    decision = ex.decision
    if decision is None:
        answer["route"] = None
        answer["reply"] = "404 no route"
        return 404, answer
    action = decision.action
    answer.update(
        virtual_host=decision.vhost,
        virtual_service=action.virtual_service,
        route=action.route_name or f"http[{action.route_index}]",
        cluster=decision.cluster,
    )
    reply = decision.local_reply
    if reply is not None:
        location = f" -> {decision.location}" if decision.location else ""
        answer["reply"] = f"{reply.status}{location}"
        return 200, answer
    view = ex.cluster
    if view is None:
        answer["reply"] = "503 no healthy upstream (no such cluster)"
        return 200, answer
    answer["upstream_path"] = decision.path
    if ex.split is not None:
        answer["weighted_pick"] = ex.split
    if ex.set_cookie is not None:
        answer["set_cookie"] = ex.set_cookie
    answer["hash_key"] = ex.hash_key
    answer["endpoints"] = [ep.key for ep in view.endpoints] if view.endpoints is not None else None
    lb = view.spec.lb
    note = ex.session
    if note is not None:
        answer["persistent_session"] = {
            "config": note.persistent.describe(),
            "value": note.value_text(),
            "address": note.address or None,
            "expires": note.expires or None,
            "pod_state": note.state or None,
            "routed": note.routed,
            "set": _session_line(note) if note.set_value is not None else None,
        }
        if note.routed:
            answer["endpoint"] = note.address
            return 200, answer
        if note.strict_reply:
            answer["reply"] = "503 no healthy upstream (strict persistent session)"
            return 200, answer
    if ex.bounded is not None:
        answer["bounded_load"] = ex.bounded
    if view.balancer is None:
        answer["reply"] = "503 no healthy upstream"
    elif lb.consistent_hash is None or ex.hash is None:
        answer["endpoint"] = None
        answer["note"] = f"chosen per request by {lb.describe} (no hash key)"
    else:
        answer["endpoint"] = ex.endpoint
    return 200, answer
