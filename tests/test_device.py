"""Rank → device mapping and CUDA-awareness detection, against fake MPI libraries built here."""

import ctypes
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from launch import ROOT, mpi_env
from pcasgd_mpi import device as dev
from pcasgd_mpi.device import CudaAware, Decision, decide_cuda_aware, local_rank, query_mpi_cuda_support

# ------------------------------------------------------------------------------ local rank


def test_local_rank_takes_the_first_launcher_variable_present():
    env = {"SLURM_LOCALID": "3", "MPI_LOCALRANKID": "1", "PMI_LOCAL_RANK": "7"}
    assert local_rank(env) == 1
    assert local_rank({"OMPI_COMM_WORLD_LOCAL_RANK": "2", **env}) == 2
    assert local_rank({"PMI_LOCAL_RANK": "5"}) == 5
    assert local_rank({"MV2_COMM_WORLD_LOCAL_RANK": "4", "PMI_LOCAL_RANK": "5"}) == 4


def test_local_rank_is_none_without_a_usable_variable():
    assert local_rank({}) is None
    assert local_rank({"OMPI_COMM_WORLD_LOCAL_RANK": "", "SLURM_LOCALID": "x"}) is None
    assert local_rank({"OMPI_COMM_WORLD_LOCAL_RANK": "garbage", "SLURM_LOCALID": "6"}) == 6


# ---------------------------------------------------------------------------- device choice


def test_cpu_and_auto_give_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.select_device("cpu", 3) == torch.device("cpu")
    assert dev.select_device("auto", 3) == torch.device("cpu")
    assert dev.select_device(" CPU ") == torch.device("cpu")


def test_cuda_without_cuda_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as err:
        dev.select_device("cuda", 0)
    text = str(err.value)
    assert "\n" not in text
    assert "'cuda' was requested" in text and "'cpu' or 'auto'" in text


def test_unknown_device_spec_is_refused():
    with pytest.raises(ValueError, match="cpu, cuda, auto"):
        dev.select_device("tpu", 0)


@pytest.mark.parametrize("spec", ["cuda", "auto"])
def test_ranks_share_the_gpus_of_a_node_round_robin(monkeypatch, spec):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [dev.select_device(spec, r) for r in range(5)] == [torch.device("cuda", i) for i in (0, 1, 0, 1, 0)]
    assert dev.select_device(spec, None) == torch.device("cuda", 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_select_device_on_a_real_gpu():
    d = dev.select_device("cuda", torch.cuda.device_count() + 1)
    assert d.type == "cuda" and d.index == 1 % torch.cuda.device_count()
    assert dev.select_device("auto", 0).type == "cuda"


# ---------------------------------------------------------------------- fake MPI libraries

FAKE_SOURCES = {
    "aware": "int MPIX_Query_cuda_support(void) { return 1; }\n",
    "unaware": "int MPIX_Query_cuda_support(void) { return 0; }\n",
    "nosymbol": "int MPI_Init(int *argc, char ***argv) { return 0; }\n",
}


@pytest.fixture(scope="module")
def fake_libs(tmp_path_factory):
    """{kind: path} of fake MPI libraries, each already loaded into this process as mpi4py would."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("needs a C compiler to build the fake MPI libraries")
    root = tmp_path_factory.mktemp("fakempi")
    libs, handles = {}, []
    for kind, source in {**FAKE_SOURCES, "mpich": FAKE_SOURCES["aware"], "unloaded": FAKE_SOURCES["aware"]}.items():
        name = "libmpich.so.12" if kind == "mpich" else "libmpi.so.40"
        (root / kind).mkdir()
        src, lib = root / kind / "fake.c", root / kind / name
        src.write_text(source)
        subprocess.run([gcc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, capture_output=True)
        if kind != "unloaded":
            handles.append(ctypes.CDLL(str(lib)))  # local visibility, like mpi4py
        libs[kind] = str(lib)
    yield libs
    del handles


def _maps(tmp_path, *paths: str) -> str:
    lines = [
        "55d0c0000000-55d0c0021000 r--p 00000000 08:01 1234 /usr/bin/python3.11",
        "7f1e2c000000-7f1e2c021000 rw-p 00000000 00:00 0 ",
        "7f1e2d000000-7f1e2d100000 r-xp 00000000 08:01 99 /opt/lib/libmpi_mpifh.so.40.0.0",
        "7ffd4b3e0000-7ffd4b401000 rw-p 00000000 00:00 0                          [stack]",
    ]
    lines += [
        f"7f1e3{i}000000-7f1e3{i}001000 r-xp 00001000 08:01 {4321 + i}                    {p}"
        for i, p in enumerate(paths)
    ]
    path = tmp_path / "maps"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_query_reads_the_answer_of_the_loaded_library(fake_libs, tmp_path):
    assert query_mpi_cuda_support(_maps(tmp_path, fake_libs["aware"])) is True
    assert query_mpi_cuda_support(_maps(tmp_path, fake_libs["unaware"])) is False
    assert query_mpi_cuda_support(_maps(tmp_path, fake_libs["mpich"])) is True


def test_query_is_none_without_the_symbol_or_without_a_library(fake_libs, tmp_path):
    assert query_mpi_cuda_support(_maps(tmp_path, fake_libs["nosymbol"])) is None
    assert query_mpi_cuda_support(_maps(tmp_path)) is None
    assert query_mpi_cuda_support(str(tmp_path / "no-such-maps")) is None


def test_query_never_loads_a_library_itself(fake_libs, tmp_path):
    assert query_mpi_cuda_support(_maps(tmp_path, fake_libs["unloaded"])) is None
    with pytest.raises(OSError):
        ctypes.CDLL(fake_libs["unloaded"], mode=os.RTLD_NOLOAD | os.RTLD_LAZY)


def test_query_skips_libraries_that_cannot_answer(fake_libs, tmp_path):
    maps = _maps(tmp_path, fake_libs["nosymbol"], fake_libs["unloaded"], fake_libs["unaware"])
    assert dev.loaded_mpi_libraries(maps) == [fake_libs[k] for k in ("nosymbol", "unloaded", "unaware")]
    assert query_mpi_cuda_support(maps) is False


# ------------------------------------------------------------------------------ decision


def test_cpu_tensors_never_need_a_cuda_aware_mpi(fake_libs, tmp_path):
    maps = _maps(tmp_path, fake_libs["aware"])
    for setting in CudaAware:
        d = decide_cuda_aware(setting, torch.device("cpu"), {"PCASGD_CUDA_AWARE": "1"}, maps_path=maps)
        assert d == Decision(False, "cpu tensors")


def test_explicit_setting_wins_over_environment_and_library(fake_libs, tmp_path):
    maps = _maps(tmp_path, fake_libs["aware"])
    assert not decide_cuda_aware(CudaAware.NO, "cuda:0", {"PCASGD_CUDA_AWARE": "1"}, maps_path=maps).cuda_aware
    maps = _maps(tmp_path, fake_libs["unaware"])
    assert decide_cuda_aware("yes", "cuda:1", {"PCASGD_CUDA_AWARE": "0"}, maps_path=maps).cuda_aware


def test_auto_follows_the_environment_override_first(fake_libs, tmp_path):
    aware = _maps(tmp_path, fake_libs["aware"])
    d = decide_cuda_aware("auto", torch.device("cuda", 0), {"PCASGD_CUDA_AWARE": "0"}, maps_path=aware)
    assert d == Decision(False, "PCASGD_CUDA_AWARE=0")
    unaware = _maps(tmp_path, fake_libs["unaware"])
    d = decide_cuda_aware(CudaAware.AUTO, "cuda", {"PCASGD_CUDA_AWARE": " 1 "}, maps_path=unaware)
    assert d == Decision(True, "PCASGD_CUDA_AWARE=1")
    with pytest.raises(ValueError, match="PCASGD_CUDA_AWARE must be 0 or 1"):
        decide_cuda_aware("auto", "cuda", {"PCASGD_CUDA_AWARE": "yes"}, maps_path=unaware)


def test_auto_asks_the_library_then_assumes_not_aware(fake_libs, tmp_path):
    d = decide_cuda_aware("auto", "cuda:0", {}, maps_path=_maps(tmp_path, fake_libs["aware"]))
    assert d.cuda_aware and "returned 1" in d.reason and fake_libs["aware"] in d.reason
    d = decide_cuda_aware("auto", "cuda:0", {}, maps_path=_maps(tmp_path, fake_libs["unaware"]))
    assert not d.cuda_aware and "returned 0" in d.reason
    d = decide_cuda_aware("auto", "cuda:0", {"PCASGD_CUDA_AWARE": ""}, maps_path=_maps(tmp_path, fake_libs["nosymbol"]))
    assert not d.cuda_aware and "has no MPIX_Query_cuda_support" in d.reason
    d = decide_cuda_aware("auto", "cuda:0", {}, maps_path=_maps(tmp_path))
    assert not d.cuda_aware and "no MPI library is loaded" in d.reason


def test_decision_is_json_for_the_summary_and_one_line_for_the_log():
    d = Decision(True, "PCASGD_CUDA_AWARE=1")
    assert json.loads(json.dumps(d.to_dict())) == {"cuda_aware": True, "reason": "PCASGD_CUDA_AWARE=1"}
    assert str(d) == "CUDA-aware MPI: yes (PCASGD_CUDA_AWARE=1)"


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError):
        decide_cuda_aware("maybe", "cuda:0", {})


# ----------------------------------------------------------------- the real MPI of this machine


def _python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=mpi_env(), cwd=ROOT, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_importing_device_pulls_in_neither_torch_nor_mpi():
    code = "import sys, pcasgd_mpi.device; print(sorted(m for m in ('torch', 'mpi4py') if m in sys.modules))"
    assert _python(code) == "[]"


def test_the_installed_open_mpi_is_not_cuda_aware():
    # A fresh process: the MPI is initialised there, not in the test runner.
    code = (
        "import json; from mpi4py import MPI; from pcasgd_mpi import device as d; "
        "print(json.dumps({'libs': d.loaded_mpi_libraries(), 'query': d.query_mpi_cuda_support(), "
        "'decision': d.decide_cuda_aware('auto', 'cuda:0', {}).to_dict(), "
        "'local': d.local_rank_from_comm(MPI.COMM_WORLD)}))"
    )
    report = json.loads(_python(code).splitlines()[-1])
    assert report["libs"], "mpi4py's MPI library should show up in /proc/self/maps"
    assert report["query"] in (False, None)
    assert report["decision"]["cuda_aware"] is False
    assert report["local"] == 0
