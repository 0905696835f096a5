"""Optional native kernels, compiled on first use with the machine's C++ compiler.

`cpu_ops()` returns the compiled module, or None where it cannot be built (no compiler,
no ninja, not x86/ARM Linux, ``LMCACHE_CPU_KERNELS=0``). Callers keep a pure-torch path
for None, so a machine without a compiler is slower, never broken. The first build
takes about half a minute and is cached by torch (``TORCH_EXTENSIONS_DIR``); it runs in
a background thread started by `start_building`, so the serving path never waits for
it unless asked to (``wait=True``, used by tests and benchmarks).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ENV = "LMCACHE_CPU_KERNELS"
_SOURCE = Path(__file__).with_name("cpu_ops.cpp")

_lock = threading.Lock()
_done = threading.Event()
_thread: threading.Thread | None = None
_module: Any = None


def _build() -> None:
    global _module
    try:
        from torch.utils.cpp_extension import load

        # at::parallel_for is inlined here: without OpenMP it would run on one thread
        flags = ["-O3", "-fopenmp"]
        if os.uname().machine in ("x86_64", "amd64"):
            flags.append("-march=native")  # built where it runs
        _module = load("lmcache_cpu_ops", [str(_SOURCE)], extra_cflags=flags,
                       extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, ...: the torch path serves
        logger.warning("lmcache CPU kernels unavailable (%s: %s); using the torch path",
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    finally:
        _done.set()


def start_building() -> None:
    """Start compiling the kernels in the background (once per process)."""
    global _thread
    if os.environ.get(ENV, "1") == "0":
        _done.set()
        return
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_build, name="lmcache-build-ops", daemon=True)
            _thread.start()


def cpu_ops(wait: bool = False) -> Any:
    """The compiled kernels, or None if they are not (yet) available."""
    if os.environ.get(ENV, "1") == "0":
        return None
    if not _done.is_set():
        start_building()
        if not wait:
            return None
        _done.wait()
    return _module
