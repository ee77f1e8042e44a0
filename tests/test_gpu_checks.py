"""The device check scripts themselves, on CPUs: tests/gpu/check_kernels.py runs end to end against
the strict fake CuPy (its references, shapes and tolerances agree with the kernels' emulation), and
tests/gpu/run.sh without a GPU says so in one line and exits 0."""

import os
import subprocess
import sys

import cuda_fake as fake

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
