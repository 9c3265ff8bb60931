"""The ``flowpp`` command: ``train``, ``eval``, ``sample``, ``demo``.

* :mod:`~flowpp_ref.cli.commands` -- the parser and what each subcommand does;
* :mod:`~flowpp_ref.cli.args` -- options to configurations, errors to exit codes;
* :mod:`~flowpp_ref.cli.plotting` -- sample grids and training curves.
"""
import sys

from flowpp_ref.runtime.threads import tune_threads  # imports neither NumPy nor numba


def main(argv=None):
    """Entry point of the ``flowpp`` script: tunes the CPU thread pools before NumPy loads
    (:func:`flowpp_ref.runtime.threads.tune_threads`), then runs the command."""
    tune_threads()
    from flowpp_ref.cli.commands import main as run
    return run(sys.argv[1:] if argv is None else argv)
