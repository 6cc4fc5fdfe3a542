"""Can this device run that bundle? A bundle's requirements checked against probe facts.

The requirements are the manifest's `compatibility` record (written by `faq-deploy build` from the
target); the facts come from `faq_runtime.probe`, run here or over SSH. Both sides are plain
dicts so the host (push preflight, `faq-deploy targets check`) and the runtime share this code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# CPU tiers in llama.cpp's names (ggml/src/CMakeLists.txt, GGML_CPU_ALL_VARIANTS), each with the
# Linux /proc/cpuinfo flags its features appear as. Order: baseline first, as llama.cpp lists them.
ISA_TIERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "armv8.0_1": ("aarch64", ()),
    "armv8.2_1": ("aarch64", ("asimddp",)),
    "armv8.2_2": ("aarch64", ("asimddp", "asimdhp")),
    "armv8.2_3": ("aarch64", ("asimddp", "asimdhp", "sve")),
    "armv8.6_1": ("aarch64", ("asimddp", "asimdhp", "sve", "i8mm")),
    "armv8.6_2": ("aarch64", ("asimddp", "asimdhp", "sve", "i8mm", "sve2")),
    "armv9.2_1": ("aarch64", ("asimddp", "asimdhp", "sve", "i8mm", "sme")),
    "armv9.2_2": ("aarch64", ("asimddp", "asimdhp", "sve", "i8mm", "sve2", "sme")),
    "x64": ("x86_64", ()),
    "sse42": ("x86_64", ("sse4_2",)),
    "sandybridge": ("x86_64", ("sse4_2", "avx")),
    "ivybridge": ("x86_64", ("sse4_2", "avx", "f16c")),
    "piledriver": ("x86_64", ("sse4_2", "avx", "f16c", "fma")),
    "haswell": ("x86_64", ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2")),
    "skylakex": ("x86_64", ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f")),
    "cannonlake": ("x86_64", ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f", "avx512vbmi")),
    "cascadelake": ("x86_64", ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f", "avx512_vnni")),
    "icelake": ("x86_64", ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f", "avx512vbmi",
                           "avx512_vnni")),
    "cooperlake": ("x86_64", ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f", "avx512_vnni",
                              "avx512_bf16")),
    "zen4": ("x86_64", ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f", "avx512vbmi", "avx512_vnni",
                        "avx512_bf16")),
    "alderlake": ("x86_64", ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx_vnni")),
    "sapphirerapids": ("x86_64", ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f", "avx512vbmi",
                                  "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")),
}
# The oldest onnxruntime that runs the builder's graphs, measured by loading one and running a token
# (scripts/onnxruntime_lines.py): 1.20 rejects ai.onnx opset 22 and 1.21–1.22 its 12-input
# GroupQueryAttention; 1.23.0 runs it. PyPI has onnxruntime 1.23 wheels for Python 3.10 and newer only
# (3.8 and 3.9 stop at 1.19.2), so that is faq_runtime's floor too (runtime/pyproject.toml pins both).
ONNXRUNTIME_MIN = "1.23.0"
PYTHON_MIN = "3.10"


def version(text: str) -> tuple[int, ...]:
    """"3.10.12" → (3, 10, 12); stops at the first part that is not a number ("1.23.0rc1" → (1, 23))."""
    parts = []
    for part in text.split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def tier_of(machine: str | None, features: list[str]) -> str | None:
    """The richest tier of `machine` whose flags all appear in `features` (most flags wins)."""
    have = set(features)
    fitting = [(len(flags), name) for name, (arch, flags) in ISA_TIERS.items()
               if arch == machine and have.issuperset(flags)]
    return max(fitting, key=lambda item: item[0])[1] if fitting else None


@dataclass(frozen=True)
class Mismatch:
    """One reason a device cannot run a bundle: what is needed, what is there, what to do."""

    field: str
    needed: str
    found: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field}: needs {self.needed}, device has {self.found} ({self.fix})"


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def check(needs: dict[str, Any], facts: dict[str, Any]) -> list[Mismatch]:
    """Every way the device described by `facts` fails the bundle's `needs`; empty when it fits."""
    found: list[Mismatch] = []
    machine = facts.get("machine")
    if needs.get("machine") and machine != needs["machine"]:
        found.append(Mismatch("architecture", needs["machine"], str(machine),
                              f"build the bundle for a {machine} target"))
    tier = needs.get("isa_tier")
    if tier and machine == needs.get("machine"):
        missing = [f for f in ISA_TIERS[tier][1] if f not in facts.get("cpu", {}).get("features", [])]
        if missing:
            have = tier_of(machine, facts["cpu"]["features"]) or "unknown"
            found.append(Mismatch("ISA tier", f"{tier} ({', '.join(ISA_TIERS[tier][1])})",
                                  f"{have} (lacks {', '.join(missing)})", "build for a target of this CPU's tier"))
    l4t = facts.get("l4t")
    if needs.get("l4t_major") is not None and (not l4t or l4t["major"] != needs["l4t_major"]):
        found.append(Mismatch("JetPack line", f"L4T R{needs['l4t_major']}",
                              f"L4T R{l4t['release']}" if l4t else "no L4T (not a Jetson)",
                              "build for the target matching this board's JetPack"))
    python = facts.get("python")
    python_min = needs.get("python_min", PYTHON_MIN)
    if python and version(python) < version(python_min):
        found.append(Mismatch("Python", f">= {python_min}", python,
                              f"install Python {python_min} or newer on the device"))
    wheels = needs.get("wheels_python")
    if wheels and python and version(python)[:2] != version(wheels)[:2]:
        found.append(Mismatch("Python", f"{wheels} (the bundle's wheels)", python,
                              "build the bundle for this device's target, or without --wheelhouse"))
    runtime = facts.get("onnxruntime")
    ort_min = needs.get("onnxruntime_min")
    if ort_min and runtime and version(runtime["version"]) < version(ort_min):
        found.append(Mismatch("onnxruntime", f">= {ort_min}", runtime["version"],
                              f"upgrade onnxruntime to {ort_min} or newer"))
    total, where, fix = (facts.get("memory", {}).get("total_bytes"), "in total",
                         "use fewer bits, a smaller model or a shorter context")
    limit = facts.get("memory", {}).get("cgroup_limit_bytes")
    if limit and (not total or limit < total):  # in a container its limit is all the memory there is
        total, where, fix = limit, "under this cgroup's limit", fix + ", or raise the container's memory limit"
    memory = needs.get("memory_bytes")
    if memory and total and total < memory:
        found.append(Mismatch("memory", f"{_gb(memory)} (weights, KV cache and runtime)", f"{_gb(total)} {where}",
                              fix))
    return found
