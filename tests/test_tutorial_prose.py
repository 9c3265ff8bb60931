"""The tutorials' prose against their stored outputs: no number the code did not print, no runtime
that the stored run contradicts.

Numbers: every decimal number and percentage in a markdown cell (outside LaTeX math, code spans,
headings and references such as "sec. 3.2", "Table 1", "appendix 8.5") must be

* a number the stored outputs print, at the prose's precision (``5.51`` matches a printed 5.5067;
  ``73%`` matches a printed 73 or 0.7312), or
* a number written in a code cell (a setting the reader can see, such as ``decay=0.95``), or
* listed in the notebook's metadata ``flowpp.numbers_not_printed`` with where it comes from (the paper's
  tables, the release's settings); each listed number must still occur in the prose.

Plain integers are not checked (counts of layers, steps and channels are too common to tell apart
from printed values). Runtimes: a duration stated in the prose ("about 5 minutes", "10 s") may not
exceed three times the stored run's wall time (the cells' execution timestamps): no part of a run
takes longer than the whole. A phrase "under N minutes" is an upper bound and always holds if the
stored run was shorter.
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))

NUMBER = re.compile(r"(?<![\w.\-^])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(%?)")
REFERENCE = re.compile(r"(?i)(?:sec\.|sections?|§|appendix|appendices|tables?|figures?|fig\.|eqs?\.|equations?|"
                       r"algorithm|tutorials?|notebooks?|cells?|part|parts|chapter|version|v)\s*"
                       r"(?:\d+(?:\.\d+)*\s*(?:,|and|-|–|to|or)\s*)*$")
DURATION = re.compile(r"(?i)(?<![\w.])(under|below|less than|more than|within|at most)?\s*(?:about|roughly|around|~)?\s*"
                      r"(\d+(?:\.\d+)?|a|one|half a)(?:\s*(?:-|to|–)\s*(\d+(?:\.\d+)?))?\s*"
                      r"(minutes?|min\b|seconds?|s\b|hours?)(?:\s+and a half)?")
UNIT_S = {"minute": 60.0, "minutes": 60.0, "min": 60.0, "second": 1.0, "seconds": 1.0, "s": 1.0, "hour": 3600.0,
          "hours": 3600.0}


def _strip(md: str) -> str:
    """Markdown without math, code spans, links' targets and headings (their numbers are not claims)."""
    md = re.sub(r"\$\$.*?\$\$", " ", md, flags=re.S)
    md = re.sub(r"\$[^$\n]*\$", " ", md)
    md = re.sub(r"`[^`]*`", " ", md)
    md = re.sub(r"\]\([^)]*\)", "]", md)
    return "\n".join(line for line in md.splitlines() if not line.lstrip().startswith("#"))


def _prose(nb):
    """(cell index, stripped text) of every markdown cell."""
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] == "markdown":
            yield i, _strip("".join(c["source"]))


def _output_text(nb) -> str:
    out = []
    for c in nb["cells"]:
        if c["cell_type"] != "code":
            continue
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append("".join(o.get("text", "")))
            elif "text/plain" in o.get("data", {}):
                out.append("".join(o["data"]["text/plain"]))
    return "\n".join(out)


PRINTED = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?")     # signs dropped: prose writes "−0.74"


def _values(text: str) -> list[float]:
    return [float(m.group(0).replace(",", "")) for m in PRINTED.finditer(text)]


def _code_text(nb) -> str:
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def unprinted_numbers(nb) -> list[str]:
    """The prose's numbers that neither the outputs print nor the code writes nor the metadata lists."""
    printed = _values(_output_text(nb))
    written = set(re.findall(r"\d+(?:\.\d+)?", _code_text(nb)))
    listed = set(nb.get("metadata", {}).get("flowpp", {}).get("numbers_not_printed", {}))
    bad = []
    for i, text in _prose(nb):
        for m in NUMBER.finditer(text):
            whole, frac, pct = m.groups()
            if not frac and not pct:
                continue                                   # plain integers: not checked
            if REFERENCE.search(text[max(0, m.start() - 40):m.start()]):
                continue                                   # "sec. 3.2", "Table 1", "appendix 8.5"
            s = m.group(0)
            v, k = float(s.replace(",", "").rstrip("%")), len(frac or "")
            if s.rstrip("%") in written or s in listed or s.rstrip("%") in listed:
                continue
            if any(round(x, k) == v for x in printed) or (pct and any(round(100 * x, k) == v for x in printed)):
                continue
            bad.append(f"markdown cell {i}: {s!r} in '...{text[max(0, m.start() - 60):m.end() + 20]}...'")
    return bad


def stale_listed_numbers(nb) -> list[str]:
    prose = "\n".join(text for _, text in _prose(nb))
    listed = nb.get("metadata", {}).get("flowpp", {}).get("numbers_not_printed", {})
    return [s for s in listed if s not in prose]


def stored_seconds(nb) -> float | None:
    """Wall time of the stored run: first cell's start to last cell's reply (nbclient's timestamps)."""
    stamps = []
    for c in nb["cells"]:
        ex = c.get("metadata", {}).get("execution", {})
        for key in ("iopub.execute_input", "shell.execute_reply"):
            if key in ex:
                stamps.append(dt.datetime.fromisoformat(ex[key].replace("Z", "+00:00")))
    return (max(stamps) - min(stamps)).total_seconds() if stamps else None


def contradicted_runtimes(nb) -> list[str]:
    total = stored_seconds(nb)
    if total is None:
        return ["no execution timestamps stored (run it with scripts/execute_tutorials.py)"]
    bad = []
    for i, text in _prose(nb):
        for m in DURATION.finditer(text):
            bound, a, b, unit = m.groups()
            a = a.lower()
            if a in ("a", "one"):
                a = "1"
            elif a == "half a":
                a = "0.5"
            seconds = float(b or a) * UNIT_S[unit.lower()] + (30.0 if "and a half" in m.group(0) else 0.0)
            if bound:
                continue                                    # an upper bound: holds when the run was shorter
            if seconds > 3 * total:
                bad.append(f"markdown cell {i}: {m.group(0).strip()!r} but the stored run took {total:.0f} s")
    return bad


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_prose_quotes_only_printed_numbers(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    bad = unprinted_numbers(nb)
    assert not bad, f"{path.name}: numbers in the prose that no output prints (format them from variables, or list " \
                    "them in metadata flowpp.numbers_not_printed with their source):\n" + "\n".join(bad)
    assert not stale_listed_numbers(nb), f"{path.name}: listed but absent from the prose: {stale_listed_numbers(nb)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_prose_runtimes_agree_with_the_stored_run(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    bad = contradicted_runtimes(nb)
    assert not bad, f"{path.name}:\n" + "\n".join(bad)


def test_the_checks_catch_a_planted_wrong_number_and_runtime():
    """A printed value quoted one digit off, and a runtime ten times the stored run, are both caught."""
    nb = json.loads(NOTEBOOKS[0].read_text(encoding="utf-8"))
    printed = [m.group(0) for m in NUMBER.finditer(_output_text(nb)) if m.group(2) and len(m.group(2)) >= 2]
    assert printed, "the notebook prints no decimal number to quote"
    value = printed[-1]
    wrong = value[:-1] + str((int(value[-1]) + 5) % 10)
    ok = copy.deepcopy(nb)
    ok["cells"].append({"cell_type": "markdown", "metadata": {}, "source": [f"The run printed {value}."]})
    assert not unprinted_numbers(ok)
    planted = copy.deepcopy(nb)
    minutes = 10 * stored_seconds(nb) / 60 + 1
    planted["cells"].append({"cell_type": "markdown", "metadata": {},
                             "source": [f"The run printed {wrong}. It takes about {minutes:.0f} minutes."]})
    assert any(repr(wrong) in b for b in unprinted_numbers(planted))
    assert any("minutes" in b for b in contradicted_runtimes(planted))
