"""llama.cpp's own inference runtime (llama-cpp-python), built from the same pinned source as the ggml library.

Used by the GGUF parity check (qeval.eval.parity): a real .gguf file is scored by llama.cpp's CPU
kernels (quantized dot products, its own activation rounding), and its per-token log-probs are set
against qeval's simulated numerics (float compute over dequantized weights).

No wheel of llama-cpp-python is on the index for this platform, and `pip install` from source would
build the whole project (tools, multimodal) inside build isolation. So `build()` reuses the sdist
`ggml_lib` pins: it builds only the `llama` shared library (with ggml-base, ggml-cpu) with cmake and
lays it out next to the sdist's pure-Python `llama_cpp` package (ctypes bindings of the same version)
in a versioned cache folder; `import_llama_cpp()` puts that folder first on sys.path. Its Python deps
(`diskcache`, imported at package import) go into the same folder with `pip install --target`, so the
shared venv is untouched. `qeval parity --setup` runs it; several minutes of compilation on 2 cores.
`QEVAL_LLAMA_CPP_DIR` points at a folder laid out the same way (llama_cpp/ with llama_cpp/lib/*.so).
"""
from __future__ import annotations

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

from qeval.core.errors import QevalError
from qeval.quant.backends.ggml_lib import SOURCE_DIST, SOURCE_VERSION, download_source, toolchain_missing

SETUP_COMMAND = "qeval parity --setup"
_PY_DEPS = ("diskcache>=5.6.1",)  # imported by llama_cpp/__init__ (llama_cache); numpy, jinja2 come from the venv


def runtime_dir() -> Path:
    env = os.environ.get("QEVAL_LLAMA_CPP_DIR")
    if env:
        return Path(env).expanduser()
    from qeval.core.env import cache_dir

    return cache_dir() / "llama-cpp" / f"{SOURCE_DIST}-{SOURCE_VERSION}"


def available() -> bool:
    return (runtime_dir() / "llama_cpp" / "lib" / "libllama.so").is_file()


def missing_reason() -> str | None:
    """None when the runtime is built; else one line saying why not and how to build it."""
    if available():
        return None
    return f"llama.cpp runtime absent at {runtime_dir()} (run `{SETUP_COMMAND}`: pip download + cmake, several minutes)"


@functools.lru_cache(maxsize=1)
def import_llama_cpp():
    """The llama_cpp module from the cache folder (raises QevalError when it is not built)."""
    reason = missing_reason()
    if reason:
        raise QevalError("GGUF parity", reason, "a built llama.cpp runtime", f"run `{SETUP_COMMAND}`")
    root = str(runtime_dir())
    if root not in sys.path:
        sys.path.insert(0, root)
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(runtime_dir() / "llama_cpp" / "lib"))
    import llama_cpp

    return llama_cpp


def build(log=print) -> Path:
    """Download the pinned sdist, build libllama (CPU) into the cache; returns the runtime folder.
    Idempotent. Raises QevalError (one line) when a tool is missing or a step fails."""
    target = runtime_dir()
    if available():
        log(f"llama.cpp runtime: {target} (already built)")
        return target
    if os.environ.get("QEVAL_LLAMA_CPP_DIR"):
        raise QevalError("QEVAL_LLAMA_CPP_DIR", str(target), "a folder holding llama_cpp/lib/libllama.so",
                         "unset it to build into the qeval cache")
    absent = toolchain_missing()
    if absent:
        raise QevalError("building llama.cpp's runtime", "needs " + ", ".join(absent),
                         "cmake and a C/C++ toolchain", "apt-get install cmake build-essential (or pip install cmake)")
    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qeval-llama-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        sdist, digest = download_source(tmp / "dl", lambda m: log(f"llama.cpp runtime: {m}"))
        t_download = time.perf_counter() - t0
        top = sdist.name[:-len(".tar.gz")]
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith((f"{top}/vendor/llama.cpp/", f"{top}/llama_cpp/"))]
            tar.extractall(tmp / "src", members=members, filter="data")
        src = tmp / "src" / top
        log("llama.cpp runtime: cmake build of libllama (CPU backend, no tools or examples)")
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        # $ORIGIN: the libraries find each other once copied next to the bindings
        _run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(tmp / "build"), *gen,
              "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_OPENMP=OFF", "-DGGML_CCACHE=OFF",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
              "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_CURL=OFF",
              "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN"], "cmake configure")
        _run(["cmake", "--build", str(tmp / "build"), "--target", "llama", "-j", str(os.cpu_count() or 2)],
             "cmake build")
        stage = tmp / "out"
        shutil.copytree(src / "llama_cpp", stage / "llama_cpp")
        (stage / "llama_cpp" / "lib").mkdir(exist_ok=True)
        for so in (tmp / "build").rglob("lib*.so*"):
            if so.is_file():  # follows symlinks: every soname the libraries ask for becomes a file
                shutil.copy2(so, stage / "llama_cpp" / "lib" / so.name, follow_symlinks=True)
        if not (stage / "llama_cpp" / "lib" / "libllama.so").is_file():
            raise QevalError("building llama.cpp's runtime", "no libllama.so after the build", "a shared library",
                             f"rerun `{SETUP_COMMAND}` and read the cmake output")
        _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(stage), *_PY_DEPS], "pip install deps")
        build_s = time.perf_counter() - t0
        (stage / "BUILD.json").write_text(json.dumps({
            "source": f"{SOURCE_DIST}=={SOURCE_VERSION}", "sdist_sha256": digest, "download_s": round(t_download, 1),
            "build_s": round(build_s, 1), "compiler": shutil.which("c++") or shutil.which("g++")}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        stage.rename(target)
    log(f"llama.cpp runtime: built {target} in {build_s:.0f} s (download {t_download:.0f} s)")
    return target


def build_info() -> dict:
    p = runtime_dir() / "BUILD.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise QevalError(f"building llama.cpp's runtime: {what}", f"exit {r.returncode}: {tail[0][:200]}",
                         "a successful step", f"rerun `{SETUP_COMMAND}`, or build it yourself and set QEVAL_LLAMA_CPP_DIR")
