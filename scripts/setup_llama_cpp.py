"""llama.cpp for the benches: the version llama-cpp-python 0.3.36 vendors, built once into the user cache.

    .venv/bin/python scripts/setup_llama_cpp.py     # build it now (about 20 minutes on 2 cores), print the paths

PyPI ships llama-cpp-python as source only. We build its vendored llama.cpp with CMake once (the shared
libraries and the two tools the benches call, llama-quantize and llama-imatrix) into
$FAQ_DEPLOY_CACHE/llama.cpp/<version>/, install the Python package into this environment without a
second compile (it finds the libraries through LLAMA_CPP_LIB_PATH), and keep the sdist's converter
(convert_hf_to_gguf.py and the gguf-py it imports). Tests never need any of it. On x86 the build uses
the vector extensions /proc/cpuinfo lists, AMX excepted (see _x86_flags): the cache belongs to this machine.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from faq_deploy.fetch import PinnedRelease, cache_dir
from faq_runtime.files import staged_dir

RELEASE = PinnedRelease("llama-cpp-python", "0.3.36", sdist=True)
TOOLS = ("llama-quantize", "llama-imatrix")
# the converter imports sentencepiece before it looks for a tokenizer.model; llama-cpp-python needs diskcache,
# and its OpenAI server (scripts/bench_server.py) the packages of its [server] extra
# x86 extensions llama.cpp's CMake can target, by their /proc/cpuinfo names. GGML_NATIVE (-march=native)
# would also enable AMX where the CPU lists it, but a virtual machine can list AMX while its kernel
# refuses the tile state: the first quantized matmul then faults on ldtilecfg (measured on this machine
# class: a general protection fault in libggml-cpu). So the build names each extension and never AMX.
_X86_FLAGS = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "avx_vnni": "GGML_AVX_VNNI", "fma": "GGML_FMA",
              "f16c": "GGML_F16C", "bmi2": "GGML_BMI2", "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI",
              "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16"}
BUILD = "no-amx"  # the recipe's name in the cache path: a build made otherwise is not reused
PYTHON_NEEDS = ("sentencepiece", "diskcache", "uvicorn", "fastapi", "sse-starlette", "starlette-context",
                "pydantic-settings")


@dataclass(frozen=True)
class LlamaCpp:
    home: Path

    @property
    def lib(self) -> Path:
        return self.home / "bin"

    @property
    def source(self) -> Path:
        return self.home / "src"

    def tool(self, name: str) -> Path:
        return self.lib / name

    def environ(self) -> dict[str, str]:
        """The environment of a process that imports llama_cpp or runs a tool."""
        return {**os.environ, "LLAMA_CPP_LIB_PATH": str(self.lib), "LD_LIBRARY_PATH": str(self.lib)}

    def convert(self, model_folder: Path, out: Path, outtype: str = "f32") -> Path:
        """A GGUF of a Hugging Face folder, by the converter that ships with this llama.cpp."""
        env = {**os.environ, "PYTHONPATH": str(self.source / "gguf-py")}
        _run([sys.executable, str(self.source / "convert_hf_to_gguf.py"), str(model_folder), "--outtype", outtype,
              "--outfile", str(out)], env)
        return out

    def imatrix(self, gguf: Path, text: Path, out: Path, chunks: int, context: int, threads: int) -> Path:
        """llama.cpp's importance matrix of `gguf` over the first `chunks` windows of `text`."""
        _run([str(self.tool("llama-imatrix")), "-m", str(gguf), "-f", str(text), "-o", str(out), "-c", str(context),
              "--chunks", str(chunks), "-t", str(threads), "--no-ppl"], self.environ())
        return out

    def quantize(self, gguf: Path, out: Path, kind: str, imatrix: Path | None, threads: int) -> Path:
        _run([str(self.tool("llama-quantize")), *(["--imatrix", str(imatrix)] if imatrix else []), str(gguf),
              str(out), kind, str(threads)], self.environ())
        return out


def _run(cmd: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} failed ({done.returncode}):\n"
                           + "\n".join(done.stderr.strip().splitlines()[-15:]))


def ensure() -> LlamaCpp:
    """The built llama.cpp, building and installing it first when this cache or environment lacks it."""
    built = LlamaCpp(cache_dir() / "llama.cpp" / f"{RELEASE.version}-{BUILD}")
    if not all(built.tool(t).exists() for t in TOOLS):
        _build(built.home)
    _install_bindings(built)
    return built


def _build(home: Path) -> None:
    archive = RELEASE.download()
    print(f"building llama.cpp from {archive.name} into {home} (about 20 minutes on 2 cores)", file=sys.stderr)
    with staged_dir(home) as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp / "sdist", filter="data")
        vendored = next((tmp / "sdist").iterdir()) / "vendor" / "llama.cpp"
        shutil.copytree(vendored / "gguf-py", tmp / "src" / "gguf-py")
        for name in ("convert_hf_to_gguf.py", "conversion"):
            copy = shutil.copytree if (vendored / name).is_dir() else shutil.copy2
            copy(vendored / name, tmp / "src" / name)
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DCMAKE_BUILD_RPATH=$ORIGIN", *_x86_flags()]
        _run(["cmake", "-S", str(vendored), "-B", str(tmp / "build"), *flags], os.environ)
        _run(["cmake", "--build", str(tmp / "build"), f"-j{os.cpu_count()}", "--target", *TOOLS, "llama"], os.environ)
        shutil.copytree(tmp / "build" / "bin", tmp / "bin", symlinks=True)
        shutil.rmtree(tmp / "build")
        shutil.rmtree(tmp / "sdist")


def _x86_flags() -> list[str]:
    if platform.machine() != "x86_64":
        return []  # GGML_NATIVE elsewhere
    listed = next((set(line.split(":", 1)[1].split()) for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("flags")), set())
    return ["-DGGML_NATIVE=OFF", *(f"-D{option}={'ON' if flag in listed else 'OFF'}"
                                   for flag, option in _X86_FLAGS.items())]


def _install_bindings(built: LlamaCpp) -> None:
    """llama-cpp-python's Python package over the built libraries (LLAMA_BUILD=OFF: no second compile)."""
    probe = subprocess.run([sys.executable, "-c", "import llama_cpp.server.app, sentencepiece, diskcache"],
                           env=built.environ(), capture_output=True)
    if probe.returncode == 0:
        return
    env = {**os.environ, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", str(RELEASE.download())], env)
    _run([sys.executable, "-m", "pip", "install", "-q", *PYTHON_NEEDS], os.environ)


if __name__ == "__main__":
    tools = ensure()
    print(f"llama.cpp {RELEASE.version}: {tools.lib} (set LLAMA_CPP_LIB_PATH to it before importing llama_cpp)")
