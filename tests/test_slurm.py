"""The SLURM job templates on a real one-node SLURM: jobs/test_slurm.sh.

It starts munged, slurmctld and slurmd on this machine (installing slurm-wlm and munge with apt-get
when they are missing, so it needs root on Debian or Ubuntu) and stops them at the end. Opt in:

    MPMP_TEST_SLURM=1 python -m pytest tests/test_slurm.py
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 480  # the script takes about 90 s on 2 cores, plus apt-get on a fresh machine
LAUNCHER_VARS = (
    "PMI_RANK",
    "PMI_SIZE",
    "PMI_FD",
    "PMIX_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "MPI_LOCALNRANKS",
    "HYDRA_CONTROL_FD",
)


@pytest.mark.skipif(
    os.environ.get("MPMP_TEST_SLURM") != "1",
    reason="set MPMP_TEST_SLURM=1 to test the SLURM templates on a local SLURM (root; starts daemons)",
)
@pytest.mark.timeout(TIMEOUT_S + 120)
def test_slurm_templates_train_preempt_requeue_and_resume_to_the_same_loss():
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    # The jobs run `python` and `mpirun` from PATH: make them this interpreter's environment.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.Popen(
        ["bash", str(ROOT / "jobs" / "test_slurm.sh")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so a timeout ends all of it
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the script's EXIT trap stops the cluster
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        subprocess.run(["bash", str(ROOT / "jobs" / "local_slurm.sh"), "stop"], env=env, timeout=120, check=False)
        pytest.fail(f"jobs/test_slurm.sh did not finish in {TIMEOUT_S} s:\n{out[-8000:]}")
    assert proc.returncode == 0, f"jobs/test_slurm.sh failed (exit code {proc.returncode}):\n{out[-8000:]}"
    assert "PASS" in out
