"""The example notebook runs top to bottom on the tiny model and shows both channels."""

import json
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from swallow_stream.checkpoint.synthetic import DEMO_REASONING

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    work = tmp_path_factory.mktemp("nb")
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    nb = nbformat.read(work / NOTEBOOK.name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    return nb


def outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            raise AssertionError(f"{out['ename']}: {out['evalue']}")
        parts.append(out.get("text", ""))
        parts.append(json.dumps(out.get("data", {}), ensure_ascii=False))
    return "".join(parts)


def test_notebook_runs_and_shows_both_channels(executed):
    code = [c for c in executed.cells if c.cell_type == "code"]
    texts = [outputs_text(c) for c in code]  # raises on any error output
    assert all(c.get("execution_count") for c in code)
    everything = "\n".join(texts)
    assert "tiny" in texts[0]
    rendered = texts[2]  # the live reasoning / answer display
    assert "**Reasoning**" in rendered and "**Answer**" in rendered
    assert f"REASONING: {DEMO_REASONING}" in rendered and "ANSWER: これは" in rendered
    assert f"reasoning: {DEMO_REASONING}" in texts[3]
    assert "channels seen: ['analysis', 'final']" in texts[4] and "answer: これは" in texts[4]
    assert "Traceback" not in everything
