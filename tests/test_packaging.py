"""The wheel ships the CUDA sources, and the kernels load from it as from a source checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nnaccel.backend import cuda_kernels

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".cu", ".cuh"))


def test_editable_install_finds_the_kernels_folder():
    folder = Path(str(cuda_kernels.kernels_dir()))
    assert folder.resolve() == (ROOT / "kernels").resolve()
    assert all((folder / name).is_file() for name in SOURCES)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    if build.returncode != 0:
        pytest.skip(f"could not build the wheel here (no PyPI for the build backend?): {build.stderr[-300:]}")
    return next(out.glob("nnaccel-*.whl"))


def test_wheel_ships_every_kernel_source(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert SOURCES and all(f"nnaccel/kernels/{name}" in names for name in SOURCES), names
    assert "nnaccel/backend/cuda_kernels.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]


def test_installed_wheel_loads_its_own_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import nnaccel; "
            "from nnaccel.backend import cuda_kernels as k; "
            "print(nnaccel.__file__); print(k.kernels_dir()); print(len(k.source('elementwise.cu')))")
    run = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, check=True)
    module, folder, size = run.stdout.split()
    assert Path(module).is_relative_to(target) and Path(folder).is_relative_to(target)
    assert sorted(p.name for p in Path(folder).iterdir() if p.suffix in (".cu", ".cuh")) == SOURCES
    assert int(size) > 1000  # the header is inlined into the source CuPy compiles
