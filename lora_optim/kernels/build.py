"""Compile ``cpu_kernels.cpp`` once per machine and load it with ctypes.

The source needs only a C++17 compiler (no torch headers), so a build takes a few seconds.
The shared library is cached under a key made of the source, the compiler, its flags and the
CPU (it is built with ``-march=native``), in ``$LORA_OPTIM_KERNEL_CACHE`` or
``~/.cache/lora_optim/kernels``. Builds write a temporary file and rename it into place, so
processes building at the same time do not corrupt each other.

Anything that goes wrong (no compiler, a failed build, an unwritable cache, a stale library)
gives one ``RuntimeWarning`` and ``None``: the callers then use their torch path.
``LORA_OPTIM_NATIVE=0`` turns the native kernels off without a warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

__all__ = ["load_library", "ABI_VERSION"]

#: Must equal ``lo_abi_version()`` in the C++ source.
ABI_VERSION = 4

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=fast", "-Wno-psabi", "-Wno-unknown-pragmas")
# Tried in order: the host's full instruction set with OpenMP (which then shares the libgomp
# torch has loaded, so torch's thread pool), without OpenMP (threads come from Python), and a
# portable build.
_ARCH_FLAGS = (("-march=native", "-fopenmp"), ("-march=native",), ())
_BUILD_TIMEOUT_S = 300

_logger = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def _cache_dir() -> Path:
    configured = os.environ.get("LORA_OPTIM_KERNEL_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lora_optim" / "kernels"


def _compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _cpu_identity() -> str:
    # -march=native code must not run on another CPU: the cache key names the CPU's features.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("model name", "flags", "Features"))]
        return "".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_key(compiler: str, flags: tuple[str, ...]) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), version.encode(), " ".join(flags).encode(),
                 platform.machine().encode(), _cpu_identity().encode(), str(ABI_VERSION).encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def _build(compiler: str, flags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        result = subprocess.run([compiler, *flags, str(_SOURCE), "-o", scratch], capture_output=True,
                                text=True, timeout=_BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


def _open(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    library.lo_abi_version.restype = ctypes.c_int
    if library.lo_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI {library.lo_abi_version()}, expected {ABI_VERSION}")
    return library


def _build_and_open() -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    errors = []
    for arch in _ARCH_FLAGS:
        flags = (*_BASE_FLAGS, *arch)
        try:
            target = _cache_dir() / f"lora_optim_cpu_{_cache_key(compiler, flags)}.so"
            if not target.exists():
                _logger.info("building %s with %s %s", target, compiler, " ".join(flags))
                _build(compiler, flags, target)
            return _open(target)
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            errors.append(f"[{' '.join(arch) or 'portable'}] {error}")
    raise RuntimeError("; ".join(errors))


def load_library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first call, then cached on disk and in memory), or ``None``
    when they are switched off or cannot be built (one ``RuntimeWarning`` says why)."""
    if os.environ.get("LORA_OPTIM_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    with _lock:
        if "library" not in _loaded:
            try:
                _loaded["library"] = _build_and_open()
            except RuntimeError as error:
                warnings.warn(f"lora_optim: native CPU kernels unavailable, using the torch path ({error})",
                              RuntimeWarning, stacklevel=3)
                _loaded["library"] = None
        return _loaded["library"]
