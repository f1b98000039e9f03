"""`serve`: one FastAPI app with the OpenAI-compatible API under /v1 (project/serve/openai_api.py) and the Gradio
page at / (project/serve/page.py), on one port.

It listens on 127.0.0.1 unless `--host` says otherwise, and any other host needs an API key. The API answers as soon
as the app starts; the page follows seconds later (`DeferredPage`): importing Gradio alone takes longer than loading
torch and the model together, so it is built in a thread while the API already serves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import ipaddress
import logging
import secrets
import socket
import threading
from collections.abc import Callable

from project.formats.checkpoint import LoadedCheckpoint
from project.serve.scheduler import Scheduler

log = logging.getLogger(__name__)

API_KEY_ENV = "PROJECT_API_KEY"  # the server's API key, when --api_key is not given


def check_can_listen(host: str, port: int) -> None:
    """ValueError naming the culprit when the app could not listen on host:port: a port out of range or in use,
    or a host that is not a name or address of this machine (checked before the model is loaded)."""
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        raise ValueError(f"--host {host} is not a known host name or address: use 127.0.0.1 (this machine only) "
                         "or 0.0.0.0 (every interface)") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ValueError(f"port {port} on {host} is in use by another program: pass another --port, or "
                                 "stop that program") from None
            raise ValueError(f"cannot listen on --host {host} --port {port} ({err.strerror}): use --host 127.0.0.1, "
                             "or an address of this machine") from None


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


class DeferredPage:
    """The ASGI app at "/": the Gradio page, built by `build` in a thread started at construction, served once the
    running app has started it (`running`, entered by the app's lifespan); until then "/" answers 503 with Retry-After
    and a page that reloads itself. `ready` is set when the page serves."""

    RETRY_SECONDS = 2

    def __init__(self, build: Callable[[], object]) -> None:
        self.built: concurrent.futures.Future = concurrent.futures.Future()
        self.app = None  # the page's FastAPI app, once started
        self.failed = False
        self.ready = threading.Event()
        # a daemon thread, not an executor's: a server stopped while Gradio still imports exits at once
        threading.Thread(target=self._build, args=(build,), name="build-page", daemon=True).start()

    def _build(self, build: Callable[[], object]) -> None:
        try:
            self.built.set_result(build())
        except BaseException as err:  # handed to `_start`, which logs it in the server's log
            self.built.set_exception(err)

    @contextlib.asynccontextmanager
    async def running(self, on_ready: Callable[[], None] | None = None):
        """Start the page (its Gradio queue and startup events) as soon as it is built, while the app runs; stop it
        when the app stops."""
        async with contextlib.AsyncExitStack() as stack:
            task = asyncio.create_task(self._start(stack, on_ready))
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _start(self, stack: contextlib.AsyncExitStack, on_ready: Callable[[], None] | None) -> None:
        try:
            app = await asyncio.wrap_future(self.built)
            await stack.enter_async_context(app.router.lifespan_context(app))
        except Exception:
            self.failed = True
            log.exception("the page could not be built; the API still serves")
            return
        self.app = app
        self.ready.set()
        if on_ready is not None:
            on_ready()

    async def __call__(self, scope, receive, send) -> None:
        if self.app is not None:
            await self.app(scope, receive, send)
            return
        from starlette.responses import HTMLResponse

        if self.failed:
            response = HTMLResponse("The page failed to start (see the server's log); the API at /v1 still serves.",
                                    status_code=500)
        else:
            response = HTMLResponse(f'<meta http-equiv="refresh" content="{self.RETRY_SECONDS}">The page is '
                                    "starting; it reloads itself in a moment. The API at /v1 already serves.",
                                    status_code=503, headers={"Retry-After": str(self.RETRY_SECONDS)})
        await response(scope, receive, send)


def build_page(loaded: LoadedCheckpoint, scheduler: Scheduler, *, api_key: str | None, max_prompt_chars: int):
    """The Gradio page (project/serve/page.py) mounted at / of its own FastAPI app, asking for `api_key` as the
    password when one is set."""
    import gradio as gr
    from fastapi import FastAPI

    from project.serve.page import build_app

    auth = None
    if api_key is not None:
        def auth(username: str, password: str) -> bool:
            return secrets.compare_digest(password.encode(), api_key.encode())
    demo = build_app(loaded, scheduler, max_prompt_chars=max_prompt_chars)
    return gr.mount_gradio_app(FastAPI(), demo, path="/", auth=auth, show_error=False, ssr_mode=False)


def build_server(loaded: LoadedCheckpoint, *, api_key: str | None = None, model_name: str = "gpt",
                 max_prompt_chars: int = 2000, slots: int = 8, max_waiting: int = 32, compile: bool = False,
                 scheduler: Scheduler | None = None, on_page_ready: Callable[[], None] | None = None):
    """One FastAPI app: the OpenAI-compatible API under /v1 (project/serve/openai_api.py) and the page at /, both
    decoding through one scheduler (`slots` requests at a time, `max_waiting` more queued; started here, with its
    decode step compiled when `compile`; or `scheduler`, already started). The app's shutdown closes it.

    The page is built in the background (see `DeferredPage`): `app.state.page_ready` is set, and `on_page_ready`
    called, once it serves. With `api_key`, the API needs it as a bearer token and the page asks for it as the password.
    """
    from fastapi import FastAPI

    from project.serve.openai_api import add_openai_routes

    scheduler = scheduler or Scheduler(loaded.model, slots=slots, max_waiting=max_waiting, compile=compile).start()
    # after the compilation, which the page's thread would only slow down (both hold Python's lock most of the time)
    page = DeferredPage(lambda: build_page(loaded, scheduler, api_key=api_key, max_prompt_chars=max_prompt_chars))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with page.running(on_page_ready):
            yield
        scheduler.close()

    server = FastAPI(title="GPT playground and OpenAI-compatible API", docs_url=None, redoc_url=None, lifespan=lifespan)
    server.state.scheduler = scheduler
    server.state.page_ready = page.ready
    add_openai_routes(server, loaded, scheduler, model_name=model_name, api_key=api_key)  # before "/": matched first
    server.mount("/", page)
    return server


def run_server(app, host: str, port: int, scheduler: Scheduler, graceful_seconds: float = 5.0) -> None:
    """Serve `app` until Ctrl-C (or SIGTERM): the first signal ends every request in flight at once (streams get an
    error event, the others a 503), so the server stops within `graceful_seconds` instead of waiting for them."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            scheduler.stop()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=graceful_seconds)
    Server(config).run()
