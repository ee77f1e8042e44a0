"""The device check scripts themselves, on CPUs: tests/gpu/check_kernels.py runs end to end against
the strict fake CuPy (its references, shapes and tolerances agree with the kernels' emulation);
tests/gpu/check_train.py, parts (b) and (c), runs whole: `python -m mpmp.train --backend cupy` in
subprocesses (and under mpirun) that import the fake as cupy; tests/gpu/run.sh without a GPU says so
in one line and exits 0, and the trainer and the benchmark asked for CuPy there give one error line
and exit 2."""

import os
import subprocess
import sys

import cuda_fake as fake
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_CUPY = os.path.join(ROOT, "tests", "fake_cupy")
LAUNCHER = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCALNRANKS", "HYDRA_")


def plain_env(**extra):
    """This environment without an MPI launcher's variables (pytest may itself run under mpirun)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER)}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def test_check_kernels_runs_on_the_fake_cupy(monkeypatch, capsys):
    fake.install(monkeypatch)
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tests", "gpu"))
    import check_kernels

    assert check_kernels.main([]) == 0, capsys.readouterr().out
    assert "0 failed" in capsys.readouterr().out


def test_run_sh_without_a_gpu_is_one_line_and_exit_0():
    # a CUDA-less machine: the probe's CuPy import fails, whatever is installed here
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": "/nonexistent-cupy-blocker",
    }
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "tests/gpu/run.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0
    assert proc.stdout.strip().splitlines() == ["tests/gpu/run.sh: no CUDA GPU visible to CuPy here; nothing to check"]


@pytest.mark.timeout(900)
def test_check_train_passes_on_the_fake_cupy(tmp_path):
    """(b) 10 steps of --backend cupy in fp32 equal NumPy (rtol 1e-4), fp16 and bf16 within 2e-2 of
    fp32; (c) two ranks through MPI with tp 2 and with pp 2 equal one process."""
    env = plain_env(PYTHONPATH=os.pathsep.join([FAKE_CUPY, ROOT]))
    cmd = [sys.executable, "tests/gpu/check_train.py", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "train: 5 passed, 0 failed" in proc.stdout, proc.stdout
    log = (tmp_path / "cupy_bf16.log").read_text()
    assert "--backend cupy --dtype bf16" in log


@pytest.mark.parametrize("program", [["mpmp.train"], ["mpmp.bench", "train"]])
def test_backend_cupy_without_a_gpu_is_one_line_and_exit_2(tmp_path, program):
    """CuPy installed, no device: CUDA's error becomes one line, not a traceback."""
    package = tmp_path / "cupy"
    package.mkdir()
    (package / "__init__.py").write_text(
        "class _Runtime:\n"
        "    @staticmethod\n"
        "    def getDeviceCount():\n"
        "        raise RuntimeError('cudaErrorNoDevice: no CUDA-capable device is detected')\n"
        "class cuda:\n"
        "    runtime = _Runtime\n"
    )
    env = plain_env(PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    cmd = [sys.executable, "-m", *program, "--backend", "cupy"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device is visible" in lines[0] and "cudaErrorNoDevice" in lines[0], lines
