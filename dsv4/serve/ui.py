"""The chat page `dsv4 serve` answers `/` with: one static HTML + JS + CSS bundle (`dsv4/serve/static/`, no build
step, nothing fetched from outside) that talks to the server's own `POST /v1/chat/completions` (streamed).

    GET /                     the page (index.html)
    GET /ui/app.js, /ui/style.css
    GET /ui/demo-tools.json   what the page needs from Python: the demo's tool definitions (`dsv4.demo.tools.TOOLS`,
                              sent with each request), the weather table the page's `get_weather` answers from
                              (`weather_report` of each city in `WEATHER`), the served model names and whether
                              the API needs a key

None of these needs an API key (the page must load to ask for one); the API routes keep theirs.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from ..demo.tools import TOOLS, WEATHER, weather_report
from .context import ServeContext

ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# the page loads nothing but its own files and talks to nothing but this server
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _asset(name: str) -> bytes:
    return resources.files("dsv4.serve").joinpath("static", name).read_bytes()


def page_config(ctx: ServeContext) -> dict[str, Any]:
    """The body of `/ui/demo-tools.json`."""
    return {"tools": list(TOOLS), "weather": {city: weather_report(city) for city in WEATHER},
            "models": list(ctx.config.served_model_names), "auth": bool(ctx.config.api_keys),
            "modes": list(ctx.config.reasoning_modes), "max_output_tokens": ctx.config.max_output_tokens}


def install_ui(app: FastAPI, ctx: ServeContext) -> None:
    """Add the page's routes to `app` (no API key on any of them)."""
    headers = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache"}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: Claude Code's reachability probe
    async def index() -> Response:
        return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers=headers)

    @app.get("/ui/demo-tools.json", include_in_schema=False)
    async def demo_tools() -> JSONResponse:
        return JSONResponse(page_config(ctx), headers={"Cache-Control": "no-cache"})

    def serve(name: str, media_type: str) -> None:
        async def asset() -> Response:
            return Response(_asset(name), media_type=media_type, headers=headers)
        app.add_api_route(f"/ui/{name}", asset, methods=["GET"], include_in_schema=False, name=f"ui-{name}")

    for name, media_type in ASSETS.items():
        serve(name, media_type)
