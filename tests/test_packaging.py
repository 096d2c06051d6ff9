"""The built distribution: `kernels/` ships as `swallow_kernels`, never as a top-level `kernels`
(that import name belongs to Hugging Face's `kernels`, which transformers imports)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_top_level_packages(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("swallow_stream-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"swallow_stream", "swallow_kernels"}
    for module in ("swallow_kernels/moe.py", "swallow_kernels/attention.py", "swallow_stream/engine/scheduler.py",
                   "swallow_stream/server/websocket.py", "swallow_stream/backends/remote.py"):
        assert module in names, module
