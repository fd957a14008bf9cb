"""llama.cpp's own quantizers, through ctypes: the ggml library built from a pinned, vendored source.

The K-quants (Q2_K..Q6_K) and IQ4_XS have no Python quantizer (gguf's classes only dequantize), and a
port would be a second implementation to trust. So qeval calls ggml's C function
`ggml_quantize_chunk` on each weight tensor, exactly what `llama-quantize` calls per tensor (without
an importance matrix: `quantize_q4_K` then runs `quantize_row_q4_K_ref`), and hands the packed bytes
to `gguf.quants.dequantize` (an independent implementation) to get the float values back.

The source is the llama.cpp tree vendored in the `llama-cpp-python` sdist on PyPI (pinned below, so
the numerics are reproducible on a fresh machine with only the package index). `build()` downloads
it with pip, extracts `vendor/llama.cpp/ggml`, and builds only the `ggml-base` shared library
(ggml.c + ggml-quants.c, portable C, no CPU-specific kernels) with cmake into the qeval cache:
`qeval setup --backend gguf-k`. About 35 s of compilation on 2 cores, plus the download.
`QEVAL_GGML_LIB` points at an already built libggml-base.so instead.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from qeval.core.errors import QevalError
from qeval.core.files import sha256_file

SOURCE_DIST = "llama-cpp-python"
SOURCE_VERSION = "0.3.36"  # vendors llama.cpp with ggml 0.25.3; part of every K-quant format's key
SETUP_COMMAND = "qeval setup --backend gguf-k"
_LIBNAME = "libggml-base.so"

# A top-level project around ggml's own CMakeLists (ggml as a subproject skips its pkg-config file,
# which the sdist does not ship); only the ggml-base target is built.
_WRAPPER = """cmake_minimum_required(VERSION 3.14)
project(qeval_ggml C CXX)
add_subdirectory(${GGML_SRC} ggml)
"""


def lib_dir() -> Path:
    from qeval.core.env import cache_dir

    return cache_dir() / "ggml" / f"{SOURCE_DIST}-{SOURCE_VERSION}"


def lib_path() -> Path:
    """Where the library is expected: $QEVAL_GGML_LIB, else the qeval cache."""
    env = os.environ.get("QEVAL_GGML_LIB")
    return Path(env).expanduser() if env else lib_dir() / _LIBNAME


def missing_error(fmt_name: str) -> QevalError:
    return QevalError(f"quantization format {fmt_name}", f"needs llama.cpp's ggml library ({lib_path()} is absent)",
                      f"ggml built from the {SOURCE_DIST} {SOURCE_VERSION} source",
                      f"run `{SETUP_COMMAND}` once (pip download + cmake, ~1-2 min), or set QEVAL_GGML_LIB")


def available() -> bool:
    return lib_path().is_file()


@functools.lru_cache(maxsize=4)
def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def library() -> ctypes.CDLL:
    path = lib_path()
    if not path.is_file():
        raise missing_error("gguf K-quant")
    return _load(str(path))


def quantize(weight: np.ndarray, type_name: str) -> np.ndarray:
    """Pack a 2-D float32 array (rows x n_per_row) into ggml type `type_name` (e.g. "Q4_K") with
    llama.cpp's own quantizer, no importance matrix; returns the packed bytes (uint8, rows x row_size)."""
    from gguf import GGMLQuantizationType

    lib = library()
    t = int(GGMLQuantizationType[type_name])
    w = np.ascontiguousarray(weight, dtype=np.float32)
    rows, n = w.shape
    if n % lib.ggml_blck_size(t):
        raise ValueError(f"{type_name}: row length {n} is not a multiple of its block {lib.ggml_blck_size(t)}")
    if lib.ggml_quantize_requires_imatrix(t):
        raise ValueError(f"{type_name} needs an importance matrix")
    row_size = lib.ggml_row_size(t, n)
    out = np.empty((rows, row_size), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(t, w.ctypes.data, out.ctypes.data, 0, rows, n, None)
    assert written == out.nbytes, (written, out.nbytes)
    return out


def toolchain_missing() -> list[str]:
    """The build tools (cmake, C and C++ compilers) that are not on PATH."""
    tools = {"cmake": shutil.which("cmake"), "C compiler": shutil.which("cc") or shutil.which("gcc"),
             "C++ compiler": shutil.which("c++") or shutil.which("g++")}
    return [k for k, v in tools.items() if not v]


def download_source(dest: Path, log) -> tuple[Path, str]:
    """The pinned llama-cpp-python sdist (which vendors llama.cpp) into `dest`: its path and sha256.
    Shared by this build and the llama.cpp runtime's (qeval.quant.backends.llama_runtime)."""
    log(f"pip download {SOURCE_DIST}=={SOURCE_VERSION} (source, ~75 MB)")
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          f"{SOURCE_DIST}=={SOURCE_VERSION}", "-d", str(dest)], "pip download")
    (sdist,) = list(Path(dest).glob("*.tar.gz"))
    return sdist, sha256_file(sdist)


def build(log=print) -> Path:
    """Download the pinned source with pip, build libggml-base with cmake into the cache; returns the
    library's path. Idempotent: an existing build is reused. Raises QevalError (one line) when a tool
    is missing."""
    env = os.environ.get("QEVAL_GGML_LIB")
    if env:  # a library built elsewhere: nothing to build, but it must exist
        if not Path(env).expanduser().is_file():
            raise QevalError("QEVAL_GGML_LIB", env, "the path of a built libggml-base.so",
                             "unset it to build into the qeval cache")
        log(f"ggml: {env} (QEVAL_GGML_LIB)")
        return Path(env).expanduser()
    target = lib_dir()
    if (target / _LIBNAME).is_file():
        log(f"ggml: {target / _LIBNAME} (already built)")
        return target / _LIBNAME
    absent = toolchain_missing()
    if absent:
        raise QevalError("building llama.cpp's ggml", "needs " + ", ".join(absent),
                         "cmake and a C/C++ toolchain", "apt-get install cmake build-essential (or pip install cmake)")
    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qeval-ggml-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        sdist, digest = download_source(tmp / "dl", lambda m: log(f"ggml: {m}"))
        t_download = time.perf_counter() - t0
        prefix = f"{sdist.name[:-len('.tar.gz')]}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:  # only the ggml tree and llama-quant.cpp (the rules ported here)
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix + "ggml/") or m.name == prefix + "src/llama-quant.cpp"]
            tar.extractall(tmp / "src", members=members, filter="data")
        ggml_src = tmp / "src" / prefix / "ggml"
        (tmp / "wrap").mkdir()
        (tmp / "wrap" / "CMakeLists.txt").write_text(_WRAPPER)
        log("ggml: cmake build of ggml-base (portable C, no CPU-specific kernels)")
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run(["cmake", "-S", str(tmp / "wrap"), "-B", str(tmp / "build"), *gen, f"-DGGML_SRC={ggml_src}",
              "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_OPENMP=OFF", "-DGGML_NATIVE=OFF",
              "-DGGML_CCACHE=OFF"], "cmake configure")
        _run(["cmake", "--build", str(tmp / "build"), "--target", "ggml-base", "-j", str(os.cpu_count() or 2)],
             "cmake build")
        (so,) = [p for p in (tmp / "build").rglob(f"{_LIBNAME}.*") if not p.is_symlink()]
        stage = tmp / "out"
        stage.mkdir()
        shutil.copy2(so, stage / _LIBNAME)
        shutil.copy2(tmp / "src" / prefix / "src" / "llama-quant.cpp", stage / "llama-quant.cpp")
        build_s = time.perf_counter() - t0
        (stage / "BUILD.json").write_text(json.dumps({
            "source": f"{SOURCE_DIST}=={SOURCE_VERSION}", "sdist_sha256": digest, "download_s": round(t_download, 1),
            "build_s": round(build_s, 1), "compiler": shutil.which("cc") or shutil.which("gcc")}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        stage.rename(target)
    log(f"ggml: built {target / _LIBNAME} in {build_s:.0f} s (download {t_download:.0f} s)")
    return target / _LIBNAME


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise QevalError(f"building llama.cpp's ggml: {what}", f"exit {r.returncode}: {tail[0][:200]}",
                         "a successful step", f"rerun `{SETUP_COMMAND} -v`, or build ggml yourself and set QEVAL_GGML_LIB")
