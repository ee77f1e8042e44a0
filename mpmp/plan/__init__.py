"""The planner: memory, communication and step time of a layout, from pure models (no MPI).

  hardware.py   profiles (a100, h100, cpu; or a JSON file): the measured rates the models need
  stages.py     which units and parameters each pipeline stage holds
  memory.py     bytes per rank as mpmp allocates them; activations with the micro-batches in flight
  comm.py       bytes per group and operation per step (the ledger's numbers), and their time
  kernels.py    what each unit computes (matrix products, elementwise traffic)
  schedule.py   the schedules' computation orders as arrays
  step_time.py  compute, the re-timed pipeline, overlapped gradient reductions, the optimizer step
  search.py     choosing the free knobs of a layout, ranking every layout of N devices
  table.py      the printed table and the JSON
  calibrate.py  measuring this machine into a cpu profile

`python -m mpmp.plan --help` is the command line. `stage_memory(cfg, stage)` is the one memory model
the trainer's start-up check uses.
"""

from mpmp.plan.memory import Memory, per_rank, stage_memory

__all__ = ["Memory", "per_rank", "stage_memory"]
