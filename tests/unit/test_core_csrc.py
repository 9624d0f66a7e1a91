"""The C kernels' sources (honellm/core/csrc) compile with every warning on and as an error, all of them together
as the library native.py builds (with AMX), and the AMX file without it; and HONE_FAST=0 / HONE_NATIVE=0 keep
the kernels off."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

import pytest

from honellm.core import native

WARNINGS = ["-Wall", "-Wextra", "-Werror"]
# What -march=native enables on the CPUs the kernels run on, spelled out so that any x86-64 machine compiles them.
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]
AMX = ["-mamx-tile", "-mamx-bf16"]


def compiler_for(flags: list[str], tmp_path) -> str:
    """A C compiler that takes `flags`, or skip the test saying why not."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"the kernels are x86-64 code; this is {platform.machine()}")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler found (set CC, or install gcc)")
    probe = tmp_path / "probe.c"
    probe.write_text("int hone_probe(void) { return 0; }\n")
    result = subprocess.run([compiler, *flags, "-c", str(probe), "-o", str(tmp_path / "probe.o")],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.skip(f"{compiler} does not take {' '.join(flags)}: {result.stderr.strip()[-200:]}")
    return compiler


def test_the_sources_are_the_package_files():
    names = [path.name for path in native.sources()]
    assert names == sorted(names) and {"gemv.c", "training.c", "amx.c"} <= set(names)
    assert (native.CSRC / "hone_kernels.h").exists()


def test_without_amx_the_amx_file_compiles_to_its_stub(tmp_path):
    """A compiler targeting a CPU without AMX builds amx.c's other branch (hone_has_amx returns 0)."""
    flags = ["-O3", "-fopenmp", "-fPIC", *AVX512, *WARNINGS]
    compiler = compiler_for(flags, tmp_path)
    result = subprocess.run([compiler, *flags, f"-I{native.CSRC}", "-c", str(native.CSRC / "amx.c"), "-o",
                             str(tmp_path / "amx.o")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_library_links_as_native_builds_it(tmp_path):
    """All sources into one shared library with native.FLAGS (-march=native replaced by the ISA flags) plus
    -Werror: no duplicate symbols, every entry point native.py binds is there."""
    flags = [f for f in native.FLAGS if f != "-march=native"] + AVX512 + AMX + ["-Werror"]
    compiler = compiler_for(flags, tmp_path)
    library = tmp_path / "hone_kernels.so"
    result = subprocess.run([compiler, *flags, f"-I{native.CSRC}", *map(str, native.sources()), "-o", str(library)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True).stdout \
        if shutil.which("nm") else ""
    for name in ("hone_bf16_gemv", "hone_rmsnorm_fwd", "hone_rmsnorm_bwd", "hone_swiglu_fwd", "hone_swiglu_bwd",
                 "hone_qkv_rotary_fwd", "hone_qkv_rotary_bwd", "hone_has_amx", "hone_amx_init", "hone_amx_pack",
                 "hone_amx_matmul"):
        assert not symbols or name in symbols, name


@pytest.mark.parametrize("switch", ["HONE_FAST", "HONE_NATIVE"])
def test_one_switch_turns_the_kernels_off(monkeypatch, tmp_path, switch):
    monkeypatch.setenv("HONE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(switch, "0")
    native._reset()
    try:
        assert not native.training_kernels() and not native.amx_available()
        assert f"{switch}=0" in native.status()
    finally:
        native._reset()
