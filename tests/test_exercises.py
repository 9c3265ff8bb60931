"""The tutorials' exercises: every worked answer passes its grader, planted wrong answers fail, an
unanswered stub is reported as not attempted, and every notebook grades each of its exercises."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
sys.path.insert(0, str(TUTORIALS))
import exercises as ex  # noqa: E402
import solutions  # noqa: E402

IDS = list(ex.EXERCISES)


def _perturbed(fn):
    """The worked answer with its first output entry nudged by 1e-3 (relative): a small slip."""
    def wrong(*args):
        out = fn(*args)
        if isinstance(out, tuple):
            return (_nudge(out[0]),) + tuple(out[1:])
        return _nudge(out)
    return wrong


def _nudge(a):
    a = np.array(a, dtype=np.float64, copy=True)
    a.reshape(-1)[0] = a.reshape(-1)[0] * 1.001 + 1e-3
    return a if a.ndim else float(a)


WRONG = {   # the mistakes a learner makes, where there is a typical one; the nudge otherwise
    "1.1": lambda x, dy, dl: solutions.sigmoid_backward(x, dy, 0 * dl),               # log-det term dropped
    "1.2": lambda x, lg, m, s: np.log(np.exp(solutions.mixture_logpdf(x, lg, m, s))),  # underflows in tails
    "2.2": lambda: np.eye(12, dtype=bool),                                             # "elementwise flow"
    "3.1": lambda d, x, eps: d / np.sqrt((x * x).mean(-1, keepdims=True) + eps),       # r treated as constant
    "4.2": lambda c, x, Wt, dyc, dyx: solutions.coupling_dc(c, x, Wt, 0 * dyc, dyx),   # identity path dropped
    "5.1": lambda lp, lq: np.log(np.exp(lp - lq).mean(0)),                             # no max shift
    "5.2": lambda: "<= 0",
    "A1.1": lambda x: (-x.mean(axis=(0, 1, 2)), np.zeros(x.shape[-1])),               # centred only
    "A2.1": lambda q, k, v, b: solutions.online_attention(q, k, v, k.shape[-2] + 1) * 1.0001,
}


@pytest.mark.parametrize("ex_id", IDS)
def test_worked_answer_passes(ex_id):
    _, _, name = ex.EXERCISES[ex_id]
    res = ex.grade(ex_id, getattr(solutions, name), quiet=True)
    assert res, str(res)


@pytest.mark.parametrize("ex_id", IDS)
def test_wrong_answer_fails(ex_id):
    _, _, name = ex.EXERCISES[ex_id]
    wrong = WRONG.get(ex_id) or _perturbed(getattr(solutions, name))
    with np.errstate(all="ignore"):
        res = ex.grade(ex_id, wrong, quiet=True)
    assert res.status == "wrong" and res.detail, str(res)


def test_stub_is_not_attempted_and_a_crash_is_wrong(capsys):
    def stub(*args):
        raise NotImplementedError

    res = ex.grade("1.1", stub)
    assert res.status == "not attempted" and "solutions.sigmoid_backward" in res.detail
    assert "Exercise 1.1 (the backward of Sigmoid): not attempted" in capsys.readouterr().out
    res = ex.grade("4.1", lambda *a: (a[0],) * 2)      # returns two arrays where three are asked
    assert res.status == "wrong" and "(dx, dr, db)" in res.detail
    res = ex.grade("3.1", lambda d, x, e: d[..., :2])  # wrong shape
    assert res.status == "wrong" and "shape" in res.detail
    with pytest.raises(KeyError, match="no exercise"):
        ex.grade("9.9", stub)


def _notebook(prefix):
    (path,) = [p for p in TUTORIALS.glob("*.ipynb") if p.name.split("_")[0] == prefix]
    return json.loads(path.read_text())


@pytest.mark.parametrize("prefix", ["1", "2", "3", "4", "5", "6", "A1", "A2"])
def test_notebook_grades_each_of_its_exercises(prefix):
    """Two to four per notebook, each graded in a code cell whose stored output is the grader's line
    (the stored notebooks carry the unanswered stubs: "not attempted")."""
    ids = ex.exercises_of(prefix)
    assert 2 <= len(ids) <= 4
    nb = _notebook(prefix if prefix.startswith("A") else f"0{prefix}")
    graded = {}
    for c in nb["cells"]:
        if c["cell_type"] != "code":
            continue
        src = "".join(c["source"])
        out = "".join("".join(o.get("text", "")) for o in c.get("outputs", []))
        for i in ids:
            if f'grade("{i}"' in src:
                graded[i] = out
    assert sorted(graded) == sorted(ids), f"graded in the notebook: {sorted(graded)}, exercises: {ids}"
    for i, out in graded.items():
        assert f"Exercise {i} (" in out and "not attempted" in out, (i, out)
