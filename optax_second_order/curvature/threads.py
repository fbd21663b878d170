"""One BLAS thread for the LAPACK calls of XLA:CPU, without an environment variable.

XLA:CPU runs ``eigh``, QR, Cholesky, LU and triangular solves in LAPACK: jaxlib binds its CPU kernels to
``scipy.linalg.cython_lapack``, so they run in the OpenBLAS that scipy bundles (``scipy.libs/libscipy_openblas*``,
not numpy's own copy). With OpenBLAS's default threads (one per core) those calls compete with XLA's own threads for
the cores: on ``digits-mlp`` on a shared 2-core machine Shampoo's mean step took 173-182 ms with them against
15 ms with ``OPENBLAS_NUM_THREADS=1``, and 16-20 ms with that library limited to one thread by ``threadpoolctl``
after it was loaded, in the same process, with no environment variable (``docs/benchmark.md``, "CPU threads").

:func:`one_lapack_thread` does that limiting: once per process, when a factorization is first traced
(:func:`~optax_second_order.one_matrix_at_a_time`) with JAX's default backend on CPU. It leaves the setting alone
where the user chose one: when ``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set. The limit
is process-wide for that library, so SciPy's own ``scipy.linalg`` calls in the same process run single-threaded too;
numpy's OpenBLAS is not touched. To keep OpenBLAS's threads, set ``OPENBLAS_NUM_THREADS`` before Python starts (to the
number of cores, say) or call ``threadpoolctl.threadpool_limits`` yourself after the first step is compiled.
"""

from __future__ import annotations

import os

import jax

__all__ = ["one_lapack_thread", "USER_THREAD_VARIABLES"]

USER_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Environment variables by which a user sets the BLAS threads; when one is set the library leaves them alone."""

_state: dict[str, object] = {"done": False, "limited": []}


def one_lapack_thread() -> list[str]:
    """Limits the BLAS library behind XLA:CPU's LAPACK kernels to one thread, once per process; returns the paths of
    the libraries it limited (empty where it did nothing: a thread variable set, another default backend, no
    OpenBLAS or MKL found, or already done).

    The libraries are those ``threadpoolctl`` finds in scipy's folders (``scipy.libs``, where wheels bundle its
    OpenBLAS) once ``scipy.linalg.cython_lapack`` is imported; if scipy is linked to a shared BLAS instead, every BLAS
    library of the process (as ``OPENBLAS_NUM_THREADS=1`` would).
    """
    if _state["done"]:
        return list(_state["limited"])
    _state["done"] = True
    if any(os.environ.get(name) for name in USER_THREAD_VARIABLES) or jax.default_backend() != "cpu":
        return []
    try:
        import scipy.linalg.cython_lapack  # noqa: F401  (what jaxlib's CPU kernels call: load it to see its BLAS)
        import threadpoolctl
    except ImportError:
        return []
    controller = threadpoolctl.ThreadpoolController().select(user_api="blas")
    paths = [lib.filepath for lib in controller.lib_controllers]
    scipy_paths = [p for p in paths if os.path.basename(os.path.dirname(p)).startswith("scipy")]
    chosen = scipy_paths or paths
    if chosen:
        controller.select(filepath=chosen).limit(limits=1)
    _state["limited"] = chosen
    return list(chosen)
