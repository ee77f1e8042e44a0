"""--comm: which transport carries a run's groups (mpmp/comm/factory.py), said at start-up with the
reason, the same on every rank; impossible requests are one clear error."""

import os
import subprocess
import sys

import pytest

from mpmp.comm import factory
from mpmp.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = {"backend": "cupy", "nccl_ok": True}


def test_nccl_is_the_default_when_every_rank_has_its_own_gpu():
    kind, why = factory.choose(None, ranks_on_node=4, devices=8, **GPU)
    assert kind == "nccl" and "every rank has its own GPU (4 ranks and 8 GPUs" in why
    assert factory.choose("auto", ranks_on_node=8, devices=8, **GPU)[0] == "nccl"


@pytest.mark.parametrize(
    "kw,reason",
    [
        ({"backend": "numpy", "nccl_ok": False, "ranks_on_node": 2, "devices": 0}, "backend is numpy"),
        ({"backend": "cupy", "nccl_ok": False, "ranks_on_node": 2, "devices": 2}, "no NCCL"),
        ({"backend": "cupy", "nccl_ok": True, "ranks_on_node": 2, "devices": 1}, "2 ranks share 1 GPU"),
    ],
)
def test_mpi_is_the_default_otherwise_and_nccl_on_request_is_refused_with_the_reason(kw, reason):
    kind, why = factory.choose(None, **kw)
    assert kind == "mpi" and reason in why
    with pytest.raises(ConfigError, match=f"--comm nccl: .*{reason}.*; use --comm mpi"):
        factory.choose("nccl", **kw)
    assert factory.choose("mpi", **kw) == ("mpi", "--comm mpi")


def test_unknown_transports_are_refused_and_the_stand_in_is_test_only():
    with pytest.raises(ConfigError, match="--comm must be one of mpi, nccl, not 'gloo'"):
        factory.choose("gloo", ranks_on_node=1, devices=0, backend="numpy", nccl_ok=False)
    kind, why = factory.choose("nccl-standin", ranks_on_node=2, devices=0, backend="numpy", nccl_ok=False)
    assert kind == "nccl-standin" and "for tests" in why
    assert factory.group_class("nccl-standin").__name__ == "NCCLStandIn"
    assert factory.group_class("mpi").__name__ == "MPIGroup"


class _World:
    def __init__(self, choices):
        self.choices = choices

    def all_gather_json(self, obj):
        return self.choices


def test_ranks_agree_on_mpi_when_any_node_rules_nccl_out():
    mixed = _World([["nccl", "default: every rank has its own GPU"], ["mpi", "default: 2 ranks share 1 GPU(s)"]])
    assert factory.agree(mixed, "nccl", "mine") == ("mpi", "default: 2 ranks share 1 GPU(s) (on another rank's node)")
    same = _World([["nccl", "a"], ["nccl", "b"]])
    assert factory.agree(same, "nccl", "a") == ("nccl", "a")


def test_start_up_says_which_transport_and_why():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_", "HYDRA_"))}
    tiny = [
        "--steps",
        "1",
        "--d-model",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--seq-len",
        "16",
        "--global-batch",
        "2",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "mpmp.train", *tiny], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "communication: none (one process: nothing crosses a process boundary)" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "mpmp.train", *tiny, "--comm", "nccl"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "rank 0: error: --comm nccl: NCCL moves GPU arrays and the backend is numpy; use --comm mpi"
    )


@pytest.mark.mpi(min_size=2)
def test_grid_on_each_transport_keeps_the_world_on_mpi(comm_of):
    from mpmp.comm.grid import ProcessGrid

    comm = comm_of(2)
    if comm is None:
        return
    for transport, name in (("mpi", "MPIGroup"), ("nccl-standin", "NCCLStandIn")):
        grid = ProcessGrid(1, 2, 1, comm=comm, transport=transport)
        assert type(grid.world).__name__ == "MPIGroup" and grid.transport == transport
        assert {type(g).__name__ for g in (grid.tp_group, grid.pp_group, grid.embed_group)} <= {name, "SelfGroup"}
        assert type(grid.pp_group).__name__ == name and grid.pp_group.batched_p2p == (transport != "mpi")
