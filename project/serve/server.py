"""`serve`: one FastAPI app with the OpenAI-compatible API under /v1 (project/serve/openai_api.py) and the Gradio
page at / (project/serve/page.py), on one port.

It listens on 127.0.0.1 unless `--host` says otherwise, and any other host needs an API key.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import secrets
import socket

from project.formats.checkpoint import LoadedCheckpoint
from project.serve.scheduler import Scheduler

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


def build_server(loaded: LoadedCheckpoint, *, api_key: str | None = None, model_name: str = "gpt",
                 max_prompt_chars: int = 2000, slots: int = 8, max_waiting: int = 32, compile: bool = False,
                 scheduler: Scheduler | None = None):
    """One FastAPI app: the OpenAI-compatible API under /v1 (project/serve/openai_api.py) and the page at /, both
    decoding through one scheduler (`slots` requests at a time, `max_waiting` more queued; started here, with its
    decode step compiled when `compile`; or `scheduler`, already started). The app's shutdown closes it.

    With `api_key`, the API needs it as a bearer token and the page asks for it as the password.
    """
    import gradio as gr
    from fastapi import FastAPI

    from project.serve.openai_api import add_openai_routes
    from project.serve.page import build_app

    scheduler = scheduler or Scheduler(loaded.model, slots=slots, max_waiting=max_waiting, compile=compile).start()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()

    server = FastAPI(title="GPT playground and OpenAI-compatible API", docs_url=None, redoc_url=None, lifespan=lifespan)
    server.state.scheduler = scheduler
    add_openai_routes(server, loaded, scheduler, model_name=model_name, api_key=api_key)  # before "/": matched first
    demo = build_app(loaded, scheduler, max_prompt_chars=max_prompt_chars)
    auth = None
    if api_key is not None:
        def auth(username: str, password: str) -> bool:
            return secrets.compare_digest(password.encode(), api_key.encode())
    return gr.mount_gradio_app(server, demo, path="/", auth=auth, show_error=False, ssr_mode=False)


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
