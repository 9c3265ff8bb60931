"""Execute tutorials/*.ipynb in place, so that they are stored with their outputs.

    python scripts/execute_tutorials.py                 # every notebook, full mode
    python scripts/execute_tutorials.py --fast 03 06    # notebooks whose name starts with 03 / 06, fast mode

Runs each notebook top to bottom with nbclient (kernel python3, in the tutorials folder,
the repository root first on PYTHONPATH), then writes it back with its outputs. Fast mode
sets FLOWPP_TUTORIAL_FAST=1 (what the test suite runs). A notebook that raises is not
rewritten. Prints the wall time and the stored size of each notebook.
"""
import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
ANSI = re.compile(r"\x1b\[[0-9;]*m")   # colour codes in IPython tracebacks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prefixes", nargs="*", help="only notebooks whose file name starts with one of these")
    ap.add_argument("--fast", action="store_true", help="set FLOWPP_TUTORIAL_FAST=1 (the test suite's mode)")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per cell (default 1200)")
    args = ap.parse_args(argv)
    paths = sorted(p for p in TUTORIALS.glob("*.ipynb")
                   if not args.prefixes or any(p.name.startswith(s) for s in args.prefixes))
    if not paths:
        sys.exit(f"no notebook in {TUTORIALS} matches {args.prefixes}")
    os.environ["FLOWPP_TUTORIAL_FAST"] = "1" if args.fast else "0"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    failed = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        t0 = time.perf_counter()
        client = nbclient.NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                                         resources={"metadata": {"path": str(path.parent)}})
        try:
            client.execute()
        except Exception as err:               # CellExecutionError, timeout, dead kernel
            failed.append(path.name)
            print(f"{path.name}: FAILED after {time.perf_counter() - t0:.0f} s\n{ANSI.sub('', str(err))}", file=sys.stderr)
            continue
        nb.metadata.pop("widgets", None)
        nbformat.write(nb, path)
        print(f"{path.name}: {'fast' if args.fast else 'full'} mode, {time.perf_counter() - t0:.0f} s, "
              f"{path.stat().st_size / 1e3:.0f} kB")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
