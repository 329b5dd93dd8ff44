"""Helpers of the HTTP front tests: raw requests (stdlib), the server's /health and
waits on the load it reports (never on time)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from serving import wait_until


def post_raw(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST ``body`` as is; (status, parsed JSON answer)."""
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health(base: str) -> dict:
    return get_json(base + "/health")[1]


def wait_idle(base: str) -> dict:
    """Wait until the server reports no active or queued request; its /health body."""
    def idle():
        h = health(base)
        return h if h["active_requests"] == 0 and h["queued_requests"] == 0 else None

    return wait_until(idle, "the server to free every slot")
