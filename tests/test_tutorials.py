"""Execute every tutorials/*.ipynb top to bottom (nbclient, kernel python3).

The kernel runs with ``FLOWPP_TUTORIAL_FAST=1`` (notebooks may shrink their sizes)
and with the repository root on ``PYTHONPATH``, in the tutorials folder. A cell
that raises fails the test with that cell's error. Notebooks are not rewritten.
Marked ``slow``: deselect with ``-m "not slow"``.
"""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
TIMEOUT_S = 600
ANSI = re.compile(r"\x1b\[[0-9;]*m")   # colour codes in IPython tracebacks


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
