"""Target registry, detection probe and build-time checks: shipped files, broken files, recorded boards,
and a real bundle checked against boards it was and was not built for."""

from __future__ import annotations

import ast
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from commands import FAQ_DEPLOY, FAQ_RUN

from faq_deploy import checks, detect, models, registry
from faq_deploy.build import BuildResult, default_out, summary
from faq_deploy.emulate import CORES, cpuinfo
from faq_deploy.errors import TargetError
from faq_deploy.export.graph import weight_files_bytes
from faq_deploy.export.options import ExportOptions
from faq_deploy.quant import make_config
from faq_deploy.quant.scheme import QuantScheme
from faq_runtime import agent, compat, probe

BOARDS = Path(__file__).parent / "fixtures" / "boards"
SHIPPED = Path(__file__).resolve().parents[1] / "targets"
# Probe roots → the target each must be detected as (fixtures/boards/README.md says where they come from).
DETECTED = {
    "orin-nano-jp6": "jetson-orin-nano-8gb",
    "xavier-nx-jp5": "jetson-xavier-nx",
    "jetson-nano-jp4": "jetson-nano",
    "raspberry-pi-5": "raspberry-pi-5",
    "raspberry-pi-4": "raspberry-pi-4",
    "rk3588-rock5b": "rk3588",
    "x86-host": "generic-x86_64",
}


def faq_deploy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FAQ_DEPLOY, *args], capture_output=True, text=True, env=env)


# --- the registry -------------------------------------------------------------------------------

def test_every_shipped_file_validates_and_every_alias_resolves() -> None:
    files = sorted(p.stem for p in SHIPPED.glob("*.toml"))
    assert files == ["generic-aarch64", "generic-x86_64", "jetson-agx-orin-64gb", "jetson-nano",
                     "jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-xavier-nx", "raspberry-pi-4",
                     "raspberry-pi-5", "rk3588"]
    loaded = registry.load()
    assert list(loaded.targets) == files
    for name in files:
        assert registry.parse((SHIPPED / f"{name}.toml").read_text(), f"{name}.toml").name == name
    for alias, name in {"jetson": "jetson-orin-nano-8gb", "orin-nano": "jetson-orin-nano-8gb", "pi5": "raspberry-pi-5",
                        "pi": "raspberry-pi-5", "pi4": "raspberry-pi-4", "x86": "generic-x86_64",
                        "JETSON": "jetson-orin-nano-8gb"}.items():
        assert loaded.resolve(alias).name == name
    assert loaded.resolve(None).name == registry.DEFAULT_TARGET


def _broken(tmp_path: Path, edit, name: str = "my-board") -> str:
    """The message of loading a copy of the Orin Nano file, renamed `name` and changed by `edit`."""
    text = (SHIPPED / "jetson-orin-nano-8gb.toml").read_text()
    text = text.replace('name = "jetson-orin-nano-8gb"', f'name = "{name}"').replace('["jetson", "orin-nano"]', "[]")
    (tmp_path / f"{name}.toml").write_text(edit(text))
    with pytest.raises(TargetError) as raised:
        registry.load([tmp_path])
    return raised.value.cause


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("cores = 6\n", ""), None),  # optional field: loads
    (lambda t: t.replace('isa_tier = "armv8.2_2"\n', ""), "missing required field capability.isa_tier"),
    (lambda t: t.replace("[build]", "[built]"), "unknown field 'built' (did you mean build?)"),
    (lambda t: t.replace("cores = 6", 'cores = "six"'), "cores = 'six' has the wrong type: must be an integer"),
    (lambda t: t.replace("ram_gb = [8]", "ram_gb = 8"), "ram_gb = 8 has the wrong type: must be a list of numbers"),
    (lambda t: t.replace('"armv8.2_2"', '"armv9"'), "capability.isa_tier = 'armv9' must be a llama.cpp CPU tier"),
    (lambda t: t.replace('"armv8.2_2"', '"haswell"'), "'haswell' is a x86_64 tier but identity.machine is 'aarch64'"),
    (lambda t: t.replace("group = 32", "group = 48"), "build.group = 48 must be a power of two"),
    (lambda t: t.replace("bits = 4", "bits = true"), "build.bits = True has the wrong type"),
    (lambda t: t.replace('providers = ["CPU"]', 'providers = ["NPU"]'), "build.providers = ['NPU'] item 'NPU' must be"),
    (lambda t: t.replace('python = "3.10"', 'python = "three"'), "software.python = 'three' must be a dotted version"),
    (lambda t: t.replace("[identity]", "[identity\n"), "not valid TOML"),
])
def test_a_broken_file_names_the_file_the_field_and_the_rule(tmp_path: Path, edit, message: str | None) -> None:
    if message is None:
        text = (SHIPPED / "jetson-orin-nano-8gb.toml").read_text().replace("jetson-orin-nano-8gb", "my-board")
        (tmp_path / "my-board.toml").write_text(edit(text.replace('["jetson", "orin-nano"]', "[]")))
        assert registry.load([tmp_path]).resolve("my-board").capability.cores is None
        return
    cause = _broken(tmp_path, edit)
    assert str(tmp_path / "my-board.toml") in cause and message in cause


def test_the_name_must_match_the_file_and_aliases_must_be_unique(tmp_path: Path) -> None:
    assert "must match the file name" in _broken(tmp_path, lambda t: t.replace('name = "my-board"', 'name = "other"'))
    (tmp_path / "my-board.toml").unlink()
    cause = _broken(tmp_path, lambda t: t.replace("aliases = []", 'aliases = ["pi"]'))
    assert "alias 'pi' is already 'raspberry-pi-5'" in cause


def test_user_folders_override_and_extend_the_shipped_targets(tmp_path: Path) -> None:
    first, second = tmp_path / "env", tmp_path / "option"
    first.mkdir()
    second.mkdir()
    orin = (SHIPPED / "jetson-orin-nano-8gb.toml").read_text()
    (first / "jetson-orin-nano-8gb.toml").write_text(orin.replace("bandwidth_gbs = 68 ", "bandwidth_gbs = 102 "))
    (second / "my-orin.toml").write_text(orin.replace('name = "jetson-orin-nano-8gb"', 'name = "my-orin"')
                                         .replace('["jetson", "orin-nano"]', '["mine"]'))
    env = {**os.environ, registry.ENV_DIRS: str(first)}
    listed = faq_deploy("targets", "list", "--targets-dir", str(second), "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    by_name = {t["name"]: t for t in json.loads(listed.stdout)}
    assert by_name["jetson-orin-nano-8gb"]["capability"]["bandwidth_gbs"] == 102
    assert by_name["my-orin"]["aliases"] == ["mine"] and len(by_name) == 11
    shown = faq_deploy("targets", "show", "mine", "--targets-dir", str(second))
    assert shown.returncode == 0 and str(second / "my-orin.toml") in shown.stdout
    table = faq_deploy("targets", "list", env=env)
    assert "user file" in table.stdout.splitlines()[0]


def test_targets_show_suggests_the_closest_names() -> None:
    shown = faq_deploy("targets", "show", "raspbery-pi-5")
    assert shown.returncode == 10 and "did you mean raspberry-pi-5" in shown.stderr
    assert json.loads(faq_deploy("targets", "show", "pi4", "--json").stdout)["capability"]["isa_tier"] == "armv8.0_1"


def test_a_broken_user_file_is_a_clean_cli_error(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('name = "bad"\n')
    done = faq_deploy("targets", "list", "--targets-dir", str(tmp_path))
    assert done.returncode == 10 and "bad.toml: missing required table [identity]" in done.stderr
    assert "Traceback" not in done.stderr


# --- the probe and detection ----------------------------------------------------------------------

@pytest.mark.parametrize("board", sorted(DETECTED))
def test_each_recorded_board_is_detected_as_its_target(board: str) -> None:
    judged = detect.match(registry.load(), probe.probe(str(BOARDS / board)))
    assert judged[0].ok and judged[0].target.name == DETECTED[board], judged[0]
    generic = next(m for m in judged if m.target.name.startswith("generic-") and m.ok)
    assert len(judged[0].confirmed) >= len(generic.confirmed)


def test_detect_explains_why_the_other_boards_do_not_match() -> None:
    done = faq_deploy("targets", "detect", "--root", str(BOARDS / "xavier-nx-jp5"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["target"] == "jetson-xavier-nx" and report["facts"]["l4t"]["release"] == "35.6.0"
    why = {c["name"]: " ".join(c["mismatches"]) for c in report["candidates"]}
    assert "L4T is R35.6.0, not R36" in why["jetson-orin-nano-8gb"]
    assert "CPU lacks asimddp" in why["jetson-orin-nano-8gb"]
    assert "machine is aarch64, not x86_64" in why["generic-x86_64"]


def test_the_probe_reads_this_machine_and_a_recording_of_it_alike(tmp_path: Path) -> None:
    live = probe.probe("/")
    assert live["machine"] == os.uname().machine and live["python"] == ".".join(map(str, sys.version_info[:3]))
    assert live["cpu"]["cores"] >= 1 and live["memory"]["total_bytes"] > 0 and live["disk"]["free_bytes"] > 0
    assert live["onnxruntime"] and "CPUExecutionProvider" in live["onnxruntime"]["providers"]
    probe.record(str(tmp_path / "rec"))
    replayed = probe.probe(str(tmp_path / "rec"))
    for key in ("machine", "model", "l4t", "cpu", "python", "onnxruntime"):
        assert replayed[key] == live[key], key
    assert replayed["memory"]["total_bytes"] == live["memory"]["total_bytes"]


# A container limited to 2 GiB that has used 1.5 GiB, 256 MiB of it reclaimable page cache: 768 MiB left.
CGROUP_LAYOUTS = {
    # v2 in a systemd slice: the limit sits on the parent, the leaf has none
    "v2": ("0::/faq.slice/box.scope\n", {
        "sys/fs/cgroup/faq.slice/memory.max": "2147483648\n",
        "sys/fs/cgroup/faq.slice/memory.current": "1610612736\n",
        "sys/fs/cgroup/faq.slice/memory.stat": "anon 1342177280\ninactive_file 268435456\n",
        "sys/fs/cgroup/faq.slice/box.scope/memory.max": "max\n",
        "sys/fs/cgroup/faq.slice/box.scope/memory.current": "1073741824\n",
        "sys/fs/cgroup/faq.slice/box.scope/memory.stat": "anon 1073741824\ninactive_file 0\n"}),
    # v1 in Docker: the container's own cgroup is mounted as the root of the hierarchy
    "v1": ("12:memory:/docker/0123abcd\n4:cpu,cpuacct:/docker/0123abcd\n", {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "2147483648\n",
        "sys/fs/cgroup/memory/memory.usage_in_bytes": "1610612736\n",
        "sys/fs/cgroup/memory/memory.stat": "cache 300000000\ntotal_inactive_file 268435456\n"}),
}


@pytest.mark.parametrize("layout", sorted(CGROUP_LAYOUTS))
def test_a_container_memory_limit_bounds_what_the_probe_reports(tmp_path: Path, layout: str) -> None:
    board = tmp_path / "board"
    shutil.copytree(BOARDS / "x86-host", board)
    membership, files = CGROUP_LAYOUTS[layout]
    for relative, text in {"proc/self/cgroup": membership, **files}.items():
        (board / relative).parent.mkdir(parents=True, exist_ok=True)
        (board / relative).write_text(text)
    host = probe.probe(str(BOARDS / "x86-host"))["memory"]
    memory = probe.probe(str(board))["memory"]
    assert memory == {"total_bytes": host["total_bytes"], "cgroup_limit_bytes": 2 * 2**30,
                      "available_bytes": 768 * 2**20}
    probe.record(str(tmp_path / "again"), str(board))  # a recording keeps the cgroup files it read
    assert probe.probe(str(tmp_path / "again"))["memory"] == memory
    problems = [str(p) for p in compat.check({"memory_bytes": 3 * 10**9}, probe.probe(str(board)))]
    assert len(problems) == 1 and "2.1 GB under this cgroup's limit" in problems[0], problems
    assert "raise the container's memory limit" in problems[0]


@pytest.mark.parametrize("script", [probe, agent], ids=["probe", "agent"])
def test_scripts_sent_to_boards_stand_alone_on_python_3_6(script: object) -> None:
    """probe.py and agent.py are copied by themselves to boards whose python3 may be 3.6 (JetPack 4)."""
    source = Path(script.__file__).read_text()
    ast.parse(source, feature_version=(3, 6))
    tree = ast.parse(source)
    assert not any(isinstance(n, ast.ImportFrom) and n.module and n.module.startswith(("faq", "__future__"))
                   for n in ast.walk(tree))


def test_the_probe_runs_alone_on_an_old_python(tmp_path: Path) -> None:
    alone = shutil.copy(probe.__file__, tmp_path / "probe.py")
    done = subprocess.run([sys.executable, "-I", alone, "--root", str(BOARDS / "jetson-nano-jp4")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["machine"] == "aarch64" and facts["python"] == "3.6.9"  # no /proc/sys/kernel/arch on kernel 4.9
    assert facts["l4t"] == {"major": 32, "revision": "7.4", "release": "32.7.4"}
    assert compat.tier_of(facts["machine"], facts["cpu"]["features"]) == "armv8.0_1"


@pytest.mark.parametrize(("body", "error"), [
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n",
     "importing onnxruntime crashed the interpreter (SIGSEGV)"),
    ("raise ImportError('libonnxruntime.so: cannot open shared object file')\n",
     "importing onnxruntime failed: ImportError: libonnxruntime.so: cannot open shared object file"),
], ids=["segfault", "import-error"])
def test_a_probe_outlives_an_onnxruntime_that_breaks_on_import(tmp_path: Path, body: str, error: str) -> None:
    """A wheel that dies on import (on arm64, of a CPU description it cannot parse: tests/test_arm64.py) is
    reported, not fatal: the push's preflight reads this JSON."""
    (tmp_path / "broken" / "onnxruntime").mkdir(parents=True)
    (tmp_path / "broken" / "onnxruntime" / "__init__.py").write_text(body)
    alone = shutil.copy(probe.__file__, tmp_path / "probe.py")
    # the module copied alone (what a push runs) and `faq-run probe`, whose CLI must not import onnxruntime
    for command in [[sys.executable, alone], [*FAQ_RUN, "probe"]]:
        done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(tmp_path / "broken")})
        assert done.returncode == 0, done.stderr
        facts = json.loads(done.stdout)
        assert facts["onnxruntime"] is None and facts["onnxruntime_error"] == error
        assert facts["machine"] == platform.machine() and facts["cpu"]["cores"] >= 1


def test_the_machine_is_the_interpreters_own(tmp_path: Path) -> None:
    """From the ELF header of the Python that runs: under qemu-user, or a 32-bit userland on a 64-bit
    kernel, /proc/sys/kernel/arch names a machine whose wheels this Python cannot load."""
    assert probe.userland_machine() == platform.machine()
    for number, machine in [(183, "aarch64"), (40, "armv7l"), (62, "x86_64")]:
        elf = tmp_path / machine
        elf.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(11) + number.to_bytes(2, "little") + bytes(44))
        assert probe.userland_machine(str(elf)) == machine
    live = probe.probe("/")
    kernel = Path("/proc/sys/kernel/arch").read_text().strip()
    assert live["machine"] == platform.machine() and live["kernel_machine"] == kernel


@pytest.mark.parametrize("tier", list(CORES))
def test_an_emulated_cores_cpuinfo_reads_as_its_tier(tier: str, tmp_path: Path) -> None:
    """The /proc/cpuinfo `build --emulated-parity` gives its board: onnxruntime picks its kernels from it, so
    it must name the features of the tier the qemu core emulates, no more."""
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text(cpuinfo(CORES[tier], 3))
    facts = probe.probe(str(tmp_path))["cpu"]
    assert facts["cores"] == 3 and facts["parts"] == [CORES[tier].part]
    assert compat.tier_of("aarch64", facts["features"]) == tier


def test_isa_tiers_follow_llama_cpp() -> None:
    orin = probe.probe(str(BOARDS / "orin-nano-jp6"))["cpu"]["features"]
    assert compat.tier_of("aarch64", orin) == "armv8.2_2"
    assert compat.tier_of("aarch64", orin + ["sve", "i8mm"]) == "armv8.6_1"
    assert compat.tier_of("x86_64", ["sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"]) == "haswell"
    assert compat.tier_of("x86_64", ["sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx_vnni"]) == "alderlake"
    assert compat.tier_of("riscv64", []) is None


# --- build-time checks ----------------------------------------------------------------------------

def _footprint(weights_gb: float, kv_gb: float, context: int = 2048) -> checks.Footprint:
    return checks.Footprint(int(weights_gb * 2**30), int(kv_gb * 2**30), context)


def test_build_checks_stop_what_a_board_cannot_run() -> None:
    targets = registry.load()
    w4 = QuantScheme(4, 32)
    assert checks.assess(targets.resolve("jetson"), w4, _footprint(0.2, 0.1)).problems == ()
    xavier = checks.assess(targets.resolve("xavier"), w4, _footprint(0.2, 0.1)).problems
    assert len(xavier) == 1 and "Python 3.8, whose newest onnxruntime is 1.19.2" in xavier[0].cause
    assert not xavier[0].forceable
    nano = checks.assess(targets.resolve("jetson-nano"), w4, _footprint(0.2, 0.1)).problems
    assert "Python 3.6" in nano[0].cause
    two_bit = checks.assess(targets.resolve("pi5"), QuantScheme(2, 32), _footprint(0.2, 0.1)).problems
    assert "does not carry 2-bit weights" in two_bit[0].cause and "--exporter dynamo" in two_bit[0].fix
    assert checks.assess(targets.resolve("pi5"), QuantScheme(8, 32), _footprint(0.2, 0.1)).problems == ()
    with pytest.raises(TargetError, match="onnxruntime"):
        checks.enforce(checks.assess(targets.resolve("xavier"), w4, _footprint(0.2, 0.1)), force=True)


def test_memory_fit_per_ram_size_and_force() -> None:
    pi4 = registry.load().resolve("pi4")  # 1, 2, 4, 8 GB; 0.4 GB reserved
    scheme = QuantScheme(4, 32)
    some = checks.assess(pi4, scheme, _footprint(1.0, 1.0))  # + 0.3 GiB runtime
    assert some.fits_gb == (4, 8) and some.too_small_gb == (1, 2) and some.problems == ()
    none = checks.assess(pi4, scheme, _footprint(6.0, 2.0, context=65536))
    assert none.fits_gb == () and none.problems[0].forceable and "at 65536 tokens" in none.problems[0].cause
    with pytest.raises(TargetError) as refused:
        checks.enforce(none, force=False)
    assert "raspberry-pi-4" in refused.value.cause and "--force" in refused.value.hint
    assert checks.enforce(none, force=True) == [none.problems[0].cause]
    assert none.decode_ceiling_tokens_s == round(12.8e9 / (8 * 2**30), 1)


def test_providers_weights_and_exporters_each_board_takes(tmp_path: Path) -> None:
    orin = (SHIPPED / "jetson-orin-nano-8gb.toml").read_text().replace('["jetson", "orin-nano"]', "[]")
    (tmp_path / "trt.toml").write_text(orin.replace("jetson-orin-nano-8gb", "trt")
                                       .replace('providers = ["CPU"]', 'providers = ["TensorRT", "CPU"]'))
    targets = registry.load([tmp_path])
    fits = _footprint(0.2, 0.1)
    trt = checks.assess(targets.resolve("trt"), QuantScheme(4, 32), fits).problems
    # what a build leaves open comes from the board: TensorRT first → QDQ weights; a choice is kept
    assert ExportOptions.for_target(targets.resolve("trt")).weights == "qdq"
    assert ExportOptions.for_target(targets.resolve("trt"), weights="matmulnbits", accuracy_level=0) == ExportOptions(
        weights="matmulnbits", accuracy_level=0, embedding="auto")
    assert "TensorRT runs no MatMulNBits" in trt[0].cause and "--weights qdq --symmetric" in trt[0].fix
    assert checks.assess(targets.resolve("trt"), QuantScheme(4, 32, symmetric=True), fits,
                         ExportOptions(weights="qdq")).problems == ()
    shipped = registry.load()
    assert checks.assess(shipped.resolve("jetson"), QuantScheme(4, 32), fits, ExportOptions(provider="cuda")
                         ).problems == ()
    no_cuda = checks.assess(shipped.resolve("pi5"), QuantScheme(4, 32), fits, ExportOptions(provider="cuda")).problems
    assert "no CUDA execution provider" in no_cuda[0].cause
    # the RK3588's four fast cores; elsewhere onnxruntime's own default, one thread per core
    assert ExportOptions.for_target(shipped.resolve("rk3588")).threads == 4
    assert ExportOptions.for_target(shipped.resolve("pi5")).threads is None
    # 5-bit codes' second node is a 2-bit MatMulNBits: the CPU graph only
    assert checks.assess(shipped.resolve("pi5"), QuantScheme(5, 32), fits).problems == ()
    for options in (ExportOptions(provider="cuda"), ExportOptions(weights="qdq")):
        five = checks.assess(shipped.resolve("jetson"), QuantScheme(5, 32, symmetric=True), fits, options).problems
        assert "5-bit codes need a 2-bit MatMulNBits node" in five[0].cause and "--bits 4 or 8" in five[0].fix
    assert checks.assess(shipped.resolve("pi5"), QuantScheme(8, 32), fits, ExportOptions(exporter="dynamo")
                         ).problems == ()


def test_a_build_without_out_goes_to_build_model_target() -> None:
    pi5 = registry.load().resolve("pi5")
    assert default_out(None, pi5) == Path("build/smollm2-135m-instruct-raspberry-pi-5")
    assert default_out("qwen2.5-coder-0.5b", pi5) == Path("build/qwen2.5-coder-0.5b-raspberry-pi-5")
    assert default_out("/models/My-Model.Q4_K_M.gguf", pi5) == Path("build/my-model.q4_k_m-raspberry-pi-5")
    assert default_out("Org/Name/", pi5) == Path("build/name-raspberry-pi-5")


# --- a real bundle against real and recorded devices ----------------------------------------------

def test_build_summary_shows_fit_and_speed_ceiling(jetson_bundle: tuple[Path, dict], real_cache: Path) -> None:
    out, result = jetson_bundle
    lines = {line.split()[0]: line for line in summary(BuildResult(**result), registry.load().resolve("jetson"))}
    assert "fits 8 GB jetson-orin-nano-8gb" in lines["fit"] and "at 8192 tokens" in lines["fit"]
    assert "MB + KV cache" in lines["fit"] and "memory" not in lines  # one line says what the fit sums
    assert "tokens/s decode at full context (68 GB/s" in lines["ceiling"]
    manifest = json.loads((out / "manifest.json").read_text())
    memory, needs = manifest["memory"], manifest["target"]["compatibility"]
    assert needs["memory_bytes"] == memory["total_bytes"] == (
        memory["weights_bytes"] + memory["kv_cache_bytes"] + memory["overhead_bytes"])
    per_token = memory["weights_bytes"] + memory["kv_cache_bytes"]
    assert memory["decode_ceiling_tokens_s"] == round(68e9 / per_token, 1)
    assert "| fit |" in (out / "REPORT.md").read_text()
    config = make_config("faq", QuantScheme(4, 32, scale_dtype="float16"))  # the build's: float16 scales
    predicted = checks.estimate(models.load(None).model, config, 8192)
    assert predicted.kv_cache_bytes == memory["kv_cache_bytes"]
    # an upper bound of the weight files (the folder also holds the tokenizer), within 1%
    assert 0.99 < weight_files_bytes(out / "model") / predicted.weights_bytes <= 1


@pytest.mark.parametrize("board, reasons", [
    ("x86-host", ["architecture: needs aarch64, device has x86_64"]),
    ("raspberry-pi-4", ["ISA tier: needs armv8.2_2", "lacks asimddp, asimdhp", "JetPack line: needs L4T R36, "
                        "device has no L4T"]),
    ("xavier-nx-jp5", ["JetPack line: needs L4T R36, device has L4T R35.6.0", "ISA tier", "Python: needs >= 3.10"]),
    ("jetson-nano-jp4", ["Python: needs >= 3.10, device has 3.6.9", "L4T R32.7.4"]),
    ("raspberry-pi-5", ["JetPack line"]),
])
def test_a_bundle_is_incompatible_with_other_boards_for_stated_reasons(jetson_bundle: tuple[Path, dict], board: str,
                                                                        reasons: list[str]) -> None:
    done = faq_deploy("targets", "check", str(jetson_bundle[0]), "--root", str(BOARDS / board))
    assert done.returncode == 10
    for reason in reasons:
        assert reason in done.stderr, done.stderr
    assert "jetson-orin-nano-8gb" in done.stderr and "Traceback" not in done.stderr


def test_a_bundle_fits_its_board_and_not_a_smaller_one(jetson_bundle: tuple[Path, dict], tmp_path: Path) -> None:
    ok = faq_deploy("targets", "check", str(jetson_bundle[0]), "--root", str(BOARDS / "orin-nano-jp6"), "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["compatible"] is True
    small = shutil.copytree(BOARDS / "orin-nano-jp6", tmp_path / "small")  # the same board with 0.8 GB of RAM
    (small / "proc" / "meminfo").write_text("MemTotal:         786432 kB\nMemAvailable:     600000 kB\n")
    done = faq_deploy("targets", "check", str(jetson_bundle[0]), "--root", str(small), "--json")
    mismatches = json.loads(done.stdout)["mismatches"]
    assert done.returncode == 10 and [m["field"] for m in mismatches] == ["memory"]
    assert mismatches[0]["found"] == "0.8 GB in total"
