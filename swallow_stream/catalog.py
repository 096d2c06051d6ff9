"""The models swallow-stream knows by name, and which one this machine can serve."""

from __future__ import annotations

MODEL_120B = "tokyotech-llm/GPT-OSS-Swallow-120B-RL-v0.1-MXFP4"
MODEL_20B = "tokyotech-llm/GPT-OSS-Swallow-20B-RL-v0.1"
TINY = "tiny"


# Largest first; the planner reads their real shapes (the synthetic presets of the same name).
BY_SIZE = ((MODEL_120B, "120b"), (MODEL_20B, "20b"))


def smaller_than(model: str) -> str | None:
    names = [m for m, _ in BY_SIZE]
    return names[names.index(model) + 1] if model in names[:-1] else None


def auto_model(gpu: tuple[int, str] | None = None) -> str:
    """The largest Swallow model this GPU holds with the default engine options (the planner's
    arithmetic on the real configs), else tiny. gpu: (total bytes, name); None: the CUDA device."""
    from .checkpoint.synthetic import preset
    from .engine.config import EngineOptions
    from .engine.planner import cuda_memory, plan_engine

    gpu = gpu or cuda_memory()
    if gpu is None:
        return TINY
    for model, shape in BY_SIZE:
        if plan_engine(preset(shape), model, EngineOptions(), gpu[0], gpu_name=gpu[1]).fits:
            return model
    return TINY
