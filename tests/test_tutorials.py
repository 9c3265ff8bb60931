"""The tutorials: every tutorials/*.ipynb is stored executed, and the suite executes each one again.

Stored outputs (not slow, no kernel): a learner reads a notebook on GitHub without running it,
so every notebook must be committed after one clean top-to-bottom run (execution counts
1, 2, 3, ...), with outputs for every code cell, no error outputs, figures as PNG, and all
notebooks together under 5 MB. ``python scripts/execute_tutorials.py`` re-executes and stores them.

Execution (slow): every notebook runs top to bottom (nbclient, kernel python3).
The kernel runs with ``FLOWPP_TUTORIAL_FAST=1`` (notebooks may shrink their sizes)
and with the repository root on ``PYTHONPATH``, in the tutorials folder. A cell
that raises fails the test with that cell's error. Notebooks are not rewritten.
Marked ``slow``: deselect with ``-m "not slow"``.
"""
import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
TIMEOUT_S = 600
ANSI = re.compile(r"\x1b\[[0-9;]*m")   # colour codes in IPython tracebacks
MAX_TOTAL_BYTES = 5 * 10**6            # all stored notebooks together


def test_there_are_tutorials():
    assert len(NOTEBOOKS) >= 6, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_is_stored_with_its_outputs(path):
    """One clean run stored: counts 1..n in order, an output for every code cell, no errors, PNG figures."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert code, f"{path.name}: no code cells"
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: execution counts {counts}; store the notebook after one clean top-to-bottom run "
        f"(python scripts/execute_tutorials.py {path.name[:2]})")
    problems = []
    for i, c in enumerate(code, 1):
        outs = c.get("outputs", [])
        if not outs:
            problems.append(f"code cell {i} has no output")
        for o in outs:
            if o["output_type"] == "error":
                problems.append(f"code cell {i} stored an error: {o.get('ename')}: {o.get('evalue')}")
            if o["output_type"] == "stream" and "Traceback" in "".join(o.get("text", "")):
                problems.append(f"code cell {i} printed a traceback")
            data = o.get("data", {})
            if any(k.startswith("image/") and k != "image/png" for k in data):
                problems.append(f"code cell {i} stores a figure that is not PNG: {sorted(data)}")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_stored_tutorials_are_small():
    sizes = {p.name: p.stat().st_size for p in NOTEBOOKS}
    assert sum(sizes.values()) < MAX_TOTAL_BYTES, f"{sum(sizes.values()) / 1e6:.2f} MB in all: {sizes}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_notebook_runs(path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="nbclient not installed: tutorials not executed "
                                                      "(pip install 'flowpp-ref[test]')")
    nbformat = pytest.importorskip("nbformat", reason="nbformat not installed: tutorials not executed")
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("FLOWPP_TUTORIAL_FAST", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    failure = None
    try:
        client.execute()
    except CellExecutionError as err:   # the message holds the failing cell's source and traceback
        failure = f"{path.name}: a cell raised\n{err}"
    except Exception as err:            # timeout, dead kernel, missing kernel spec
        failure = f"{path.name}: execution failed: {type(err).__name__}: {err}"
    if failure is not None:
        pytest.fail(ANSI.sub("", failure), pytrace=False)
