"""Optional native kernels, compiled on first use with the machine's C++ compiler.

`cpu_ops()` returns the compiled module, or None where it cannot be had (no compiler,
no ninja, ``LMCACHE_CPU_KERNELS=0``). Callers keep a pure-torch path for None, so a
machine without a compiler is slower, never broken.

The library is built once per source, flags, torch and Python version into a private
temporary directory and then moved atomically to
``$LMCACHE_KERNEL_CACHE`` (default ``~/.cache/lmcache/kernels``); later processes only
import it (no compiler run, no lock). A build takes about half a minute and runs in a
background thread started by `start_building`, so the serving path never waits for it
unless asked to (``wait=True``, used by tests and benchmarks). A process that exits in
the middle of a build leaves nothing behind that another process would wait on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ENV = "LMCACHE_CPU_KERNELS"
CACHE_ENV = "LMCACHE_KERNEL_CACHE"
NAME = "lmcache_cpu_ops"
_SOURCE = Path(__file__).with_name("cpu_ops.cpp")
#: Longest `cpu_ops(wait=True)` waits for a build.
BUILD_WAIT_S = 600

_lock = threading.Lock()
_done = threading.Event()
_thread: threading.Thread | None = None
_module: Any = None


def _flags() -> list[str]:
    # at::parallel_for is inlined into this library: without OpenMP it runs on one thread
    flags = ["-O3", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")  # built where it runs; the cache path includes the host
    return flags


def _cpu_features() -> bytes:
    # -march=native code runs only on a processor with the same instruction sets
    try:
        with open("/proc/cpuinfo", "rb") as f:
            for line in f:
                if line.startswith((b"flags", b"Features")):
                    return line
    except OSError:
        pass
    return platform.processor().encode()


def library_path() -> Path:
    """Where the library for this source, these flags and this torch/Python lives."""
    import torch

    ident = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_flags()).encode(), torch.__version__.encode(),
                 sys.version.encode(), platform.machine().encode(), _cpu_features()):
        ident.update(part + b"\0")
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "lmcache", "kernels")
    return Path(base) / f"{NAME}-{ident.hexdigest()[:16]}.so"


def _import(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(NAME, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(target: Path) -> Any:
    from torch.utils.cpp_extension import load

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lmcache-build-") as tmp:
        module = load(NAME, [str(_SOURCE)], extra_cflags=_flags(), extra_ldflags=["-fopenmp"],
                      build_directory=tmp, verbose=False)
        staged = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(module.__file__, staged)
        os.replace(staged, target)  # other processes see the whole library or none
    return module


def _build() -> None:
    global _module
    try:
        path = library_path()
        if path.is_file():
            try:
                _module = _import(path)
                return
            except ImportError as exc:  # a damaged cache entry: build it again
                logger.warning("rebuilding %s (%s)", path, exc)
        _module = _compile(path)
    except Exception as exc:  # no compiler, no ninja, ...: the torch path serves
        logger.warning("lmcache CPU kernels unavailable (%s: %s); using the torch path",
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    finally:
        _done.set()


def start_building() -> None:
    """Load or compile the kernels in the background (once per process)."""
    global _thread
    if os.environ.get(ENV, "1") == "0":
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
        if not wait or not _done.wait(BUILD_WAIT_S):
            return None
    return _module
