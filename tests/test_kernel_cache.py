"""numba's disk cache of the kernels is keyed on the sources of their whole folder, so a change in a
helper module (inlined into a kernel of another module) recompiles the kernel instead of loading a
stale binary."""
import os
import subprocess
import sys
import textwrap

from flowpp_ref.kernels import NUMBA_OPTS
from flowpp_ref.kernels import numba as kernels_numba

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(folder, cache_dir, keyed):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {folder!r})
        from flowpp_ref.kernels.numba import install_source_keyed_cache
        if {keyed!r}:
            assert install_source_keyed_cache({folder!r})
        import kernel
        print(kernel.f(1.0))
    """)
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return float(r.stdout.split()[-1])


def _write_helper(folder, add):
    with open(os.path.join(folder, "helper.py"), "w") as f:
        f.write(f"import numba\n@numba.njit\ndef h(x):\n    return x + {add}\n")


def test_a_changed_helper_module_recompiles_the_kernel_that_inlines_it(tmp_path):
    folder = str(tmp_path / "mods")
    os.makedirs(folder)
    with open(os.path.join(folder, "kernel.py"), "w") as f:
        f.write("import numba\nfrom helper import h\n@numba.njit(cache=True)\ndef f(x):\n    return h(x) * 10.0\n")
    _write_helper(folder, 1.0)
    cache = str(tmp_path / "cache")
    assert _run(folder, cache, keyed=True) == 20.0          # compiled and cached
    assert _run(folder, cache, keyed=True) == 20.0          # loaded from the cache
    _write_helper(folder, 2.0)                              # only the helper changes
    assert _run(folder, cache, keyed=True) == 30.0          # recompiled, not the stale 20.0


def test_the_package_kernels_use_the_source_keyed_cache():
    from numba.core import caching
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl")
    folder = os.path.dirname(os.path.realpath(kernels_numba.__file__))
    first = impl._locator_classes[0]
    assert kernels_numba.CACHE_OK and NUMBA_OPTS["cache"] is True
    assert getattr(first, "_flowpp_folder", None) == folder
    # the stamp covers every kernel module and kernels/__init__.py (where NUMBA_OPTS live)
    extra = (os.path.join(os.path.dirname(folder), "__init__.py"),)
    d1 = kernels_numba.sources_digest(folder, extra)
    assert d1 == kernels_numba.sources_digest(folder, extra) and len(d1) == 64
    assert d1 != kernels_numba.sources_digest(folder, ())
