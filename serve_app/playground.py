"""The browser playground at ``/``: its page and static files (package data under ``static/``).

They carry no data: the page's script reads everything through the API with the key the user types,
so the API-key gate lets exactly these paths through (``PAGE_PATHS``).
"""

from __future__ import annotations

import html
from functools import lru_cache
from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
ASSETS = {"playground.js": "text/javascript", "playground.css": "text/css"}
PAGE_PATHS = ("/", *(f"/static/{name}" for name in ASSETS))

# The page handles an API key: scripts, styles and requests from this origin only, nothing inline,
# and the key never leaves in a Referer.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data: blob:; media-src 'self' blob:; base-uri 'self'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


@lru_cache(maxsize=1)
def _template() -> str:
    return (STATIC_DIR / "playground.html").read_text(encoding="utf-8")


def page(root_path: str) -> str:
    """The page, its relative URLs based at the app's route prefix (Serve's ``root_path``: ``/`` or ``/pg``)."""
    return _template().replace("{{base}}", html.escape(root_path.rstrip("/") + "/", quote=True))


def asset(name: str) -> tuple[Path, str] | None:
    """A static file's path and media type; None for any name that is not one of ``ASSETS``."""
    media_type = ASSETS.get(name)
    return (STATIC_DIR / name, media_type) if media_type else None
