"""Security headers on every HTTP answer of the app: the page gets a strict Content-Security-Policy.

The web page (``/ui``) loads only its own scripts and stylesheet, shows images the user picked (``blob:``
URLs) and the webcam, and talks only to this origin (its ``/v1`` API and ``/openapi.json``); so its policy
allows exactly that, and no other site may frame it (clickjacking). Other answers (JSON, Swagger UI's
``/docs``, which needs its inline script) get ``frame-ancestors 'none'`` only. ``X-Content-Type-Options:
nosniff`` everywhere: a browser never runs a response as something other than its declared type.
"""

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "media-src 'self' blob: mediastream:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
OTHER_POLICY = "frame-ancestors 'none'"


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        page = path == "/" or path == "/ui" or path.startswith("/ui/")
        policy = PAGE_POLICY if page else OTHER_POLICY

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = policy
                headers["X-Content-Type-Options"] = "nosniff"
            await send(message)

        await self.app(scope, receive, send_with_headers)
