"""``/console``: a small operator's page for this replica, served by the app itself.

The HTML is one static shell (it holds no data, so it is served without a token);
``console.js`` reads everything with ``Authorization: Bearer <token>`` from the same
API a client uses — ``/admin/state``, ``/admin/runs``, ``/v1/runs/...`` — so the
console has exactly the authorization of ``/v1``. Nothing is fetched from outside the
pod (clusters are often air-gapped): the script and the stylesheet are package data.

Every console response carries a strict Content-Security-Policy: only this origin's
script and stylesheet run, nothing inline, no frames, no form posts elsewhere. With
``textContent`` rendering in the script, a run's metadata, events and output (all
attacker-controlled) are shown as text and can never become markup.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Final

from litestar import Response, Router, get
from litestar.enums import MediaType
from litestar.params import FromPath

#: The policy of every console response (see the module docstring).
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_STATIC: Final = {
    "console.js": "text/javascript",
    "console.css": "text/css",
}


@cache
def _asset(name: str) -> bytes:
    """A file of ``service/web/console_static`` (read once, on first use)."""
    return (files("service.web") / "console_static" / name).read_bytes()


def _page() -> Response[bytes]:
    return Response(
        _asset("console.html"),
        media_type=MediaType.HTML,
        headers={**SECURITY_HEADERS, "Cache-Control": "no-store"},
    )


@get("/", include_in_schema=False, sync_to_thread=False)
def overview() -> Response[bytes]:
    """The replica's state, its active runs and its recent runs."""
    return _page()


@get("/runs/{run_id:str}", include_in_schema=False, sync_to_thread=False)
def run_page(run_id: FromPath[str]) -> Response[bytes]:
    """One run: its record and its live events. The script reads the id from the path."""
    del run_id  # the shell is the same for every run; it holds no data
    return _page()


@get("/static/{name:str}", include_in_schema=False, sync_to_thread=False)
def static(name: FromPath[str]) -> Response[bytes]:
    media_type = _STATIC.get(name)
    if media_type is None:
        return Response(b"not found", status_code=404, media_type=MediaType.TEXT,
                        headers=SECURITY_HEADERS)  # fmt: skip
    return Response(
        _asset(name),
        media_type=media_type,
        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
    )


console_router: Final = Router(path="/console", route_handlers=[overview, run_page, static])
