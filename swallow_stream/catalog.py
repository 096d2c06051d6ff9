"""The models swallow-stream knows by name, and which one this machine can serve."""

from __future__ import annotations

MODEL_120B = "tokyotech-llm/GPT-OSS-Swallow-120B-RL-v0.1-MXFP4"
MODEL_20B = "tokyotech-llm/GPT-OSS-Swallow-20B-RL-v0.1"
TINY = "tiny"


def auto_model() -> str:
    """The model this hardware can serve: 120B MXFP4 on an 80 GB-class GPU, 20B on 16 GB+, else tiny."""
    try:
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            if total >= 75 * 2**30:
                return MODEL_120B
            if total >= 15 * 2**30:
                return MODEL_20B
    except Exception:  # no usable CUDA: fall through to tiny
        pass
    return TINY
