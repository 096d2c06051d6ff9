"""Helpers shared by the engine-level tests."""

import time


def wait_idle(engine, timeout=20.0):
    """Wait until the engine has no request and every KV block is free; -> its snapshot."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        snap = engine.snapshot()
        if engine.num_unfinished == 0 and snap["running"] == 0 and snap["waiting"] == 0 and snap["kv_blocks_used"] == 0:
            return snap
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {engine.snapshot()}")
