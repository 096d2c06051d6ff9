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


def script_tokens(engine, token_ids):
    """Make the engine's model 'generate' token_ids for every request (the real loop,
    scheduler and parser run; only the sampled ids are replaced)."""
    real_run = engine.runner.run
    it = {}

    def run(batch):
        out = real_run(batch)
        fixed = []
        for (seq, n), o in zip([b for b in batch if b[0].num_computed + b[1] == len(b[0].token_ids)], out):
            i = it.setdefault(seq.seq_id, 0)
            it[seq.seq_id] = i + 1
            fixed.append((token_ids[i] if i < len(token_ids) else o[0], o[1], o[2]))
        return fixed

    engine.runner.run = run
