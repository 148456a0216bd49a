"""The web chat page's two routes on the ingress's FastAPI app: `GET /` (index.html) and `/web/*` (its
scripts, styles and icon, from `serve/web/` or the configured `web_dir`).

Why not one static mount at `/`: Starlette lets a mount at `/` take every path, so `GET
/v1/chat/completions` would get the mount's 404 instead of the API's 405, and any unknown `/v1/...` path
would answer as a missing file. Giving the page `/` and `/web/` only leaves the API's routing as it is.

The page needs no key (it holds no data; a browser cannot send a key for the page itself), and it gets
a strict Content-Security-Policy: its own scripts only, images from itself and `data:`/`blob:` URLs,
requests to its own origin only, so model output or a pasted file can never run script or reach
another site.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

SHIPPED_WEB_DIR = Path(__file__).resolve().parent / "web"
PAGE_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def web_dir_of(configured: str | None) -> Path:
    """The page's directory: the configured one or the shipped `serve/web/`; it must hold index.html."""
    directory = Path(configured).expanduser().resolve() if configured else SHIPPED_WEB_DIR
    if not (directory / "index.html").is_file():
        raise ValueError(f"web_dir {str(directory)!r} has no index.html (set web_page: false to serve the API only)")
    return directory


def add_web_page(app: FastAPI, configured_dir: str | None) -> None:
    """Serve the page at `/` and its files under `/web/` (after the API routes, which keep precedence)."""
    directory = web_dir_of(configured_dir)
    index = directory / "index.html"

    async def page() -> FileResponse:
        return FileResponse(index, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    app.add_api_route("/", page, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount("/web", StaticFiles(directory=directory), name="web")
