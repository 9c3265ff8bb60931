"""numba kernels for the CPU, each the twin of a plain-array function that the tests compare it with.

The on-disk cache is keyed on the sources of this whole folder
--------------------------------------------------------------
numba's cache (``cache=True``) checks only the file that defines a kernel: a kernel compiled with
a helper from another module (``fastexp.fast_exp``, the ``simd`` intrinsics) has the helper's
machine code inlined, and when the helper's file changes numba would still load the old binary.
:func:`install_source_keyed_cache` puts a cache locator in front of numba's own for the kernels of
one folder: the same cache directory as numba's (``__pycache__`` beside the file, or
``NUMBA_CACHE_DIR``), but its freshness stamp is the SHA-256 of every ``.py`` file of the folder
(plus the extra files given). Any change to any kernel module recompiles every kernel of the
folder once; nothing else changes. It is installed for this folder when the package is imported.
If numba's cache internals are not where this expects (another numba version), the kernels of
this folder compile without the disk cache rather than risk a stale one.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import warnings

from numba.core import caching, config

_HERE = os.path.dirname(os.path.abspath(__file__))
_KERNELS_INIT = os.path.join(os.path.dirname(_HERE), "__init__.py")     # NUMBA_OPTS live there


@functools.lru_cache(maxsize=None)
def sources_digest(folder: str, extra: tuple = ()) -> str:
    """SHA-256 over the names and contents of ``folder/*.py`` and ``extra``, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(folder, "*.py"))) + sorted(extra):
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read() + b"\0")
    return h.hexdigest()


def install_source_keyed_cache(folder: str, extra: tuple = ()) -> bool:
    """Key numba's cache of the kernels defined in ``folder`` on :func:`sources_digest`.

    Returns True when installed (or already installed for ``folder``); False when numba's cache
    classes were not found, in which case :data:`CACHE_OK` is False and the kernel modules pass
    ``cache=False``.
    """
    folder = os.path.realpath(folder)
    try:
        impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl")
        base = getattr(caching, "InTreeCacheLocator", None) or getattr(caching, "_InTreeCacheLocator")
        locators = impl._locator_classes
    except (ImportError, AttributeError):
        warnings.warn("numba's cache locators were not found: flowpp_ref's kernels compile without the disk cache")
        return False
    if any(getattr(c, "_flowpp_folder", None) == folder for c in locators):
        return True

    class SourceKeyedLocator(base):
        _flowpp_folder = folder

        def __init__(self, py_func, py_file):
            super().__init__(py_func, py_file)
            if config.CACHE_DIR:          # NUMBA_CACHE_DIR, as numba's own user-provided locator
                self._cache_path = os.path.join(config.CACHE_DIR, self.get_suitable_cache_subpath(py_file))

        def get_source_stamp(self):
            return sources_digest(folder, tuple(extra))

        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.realpath(py_file)) != folder:
                return None
            return super().from_function(py_func, py_file)

    locators.insert(0, SourceKeyedLocator)
    return True


CACHE_OK = install_source_keyed_cache(_HERE, (_KERNELS_INIT,))
if not CACHE_OK:
    from flowpp_ref.kernels import NUMBA_OPTS
    NUMBA_OPTS["cache"] = False       # every kernel option set below derives from this dict
