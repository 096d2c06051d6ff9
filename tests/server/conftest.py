"""Fixtures for the server tests: real servers on loopback (uvicorn in a thread), the tiny model
loaded once per session, a scripted backend with chosen channels, and a vLLM stand-in."""

from __future__ import annotations

import pytest

from server_helpers import ScriptedBackend, make_standin_app, serve


@pytest.fixture(scope="session")
def tiny_backend():
    from swallow_stream import load

    b = load("tiny", make_default=False, max_num_seqs=40, max_queued_requests=64)
    yield b
    b.shutdown()


@pytest.fixture(scope="session")
def tiny_server(tiny_backend):
    from swallow_stream.server import Settings, build_app

    settings = Settings(ws_max_frame_bytes=64 << 10, ws_max_generations=3, ui_concurrency=8, model_source="flag",
                        ui_default_max_tokens=48)
    with serve(build_app(tiny_backend, settings)) as srv:
        srv.backend = tiny_backend
        yield srv


@pytest.fixture(scope="session")
def tiny_auth_server(tiny_backend):
    from swallow_stream.server import Settings, build_app

    with serve(build_app(tiny_backend, Settings(api_key="sekret-key"), ui=False)) as srv:
        srv.backend = tiny_backend
        yield srv


@pytest.fixture(scope="session")
def limited_server():
    """A second tiny engine with one slot, no queue and a short context: overloaded and
    context_length_exceeded happen for real."""
    from swallow_stream import load
    from swallow_stream.server import Settings, build_app

    b = load("tiny", make_default=False, max_num_seqs=1, max_queued_requests=0, max_model_len=128)
    with serve(build_app(b, Settings(), ui=False)) as srv:
        srv.backend = b
        yield srv
    b.shutdown()


@pytest.fixture()
def scripted_backend():
    return ScriptedBackend()


@pytest.fixture(scope="session")
def standin():
    state: dict = {}
    with serve(make_standin_app(state)) as srv:
        srv.state = state
        yield srv


@pytest.fixture(scope="session")
def remote_server(standin):
    from swallow_stream import load
    from swallow_stream.server import Settings, build_app

    backend = load(None, backend="openai", base_url=standin.url + "/v1", make_default=False)
    settings = Settings(model_source="remote")
    with serve(build_app(backend, settings)) as srv:
        srv.backend = backend
        yield srv
    backend.shutdown()
