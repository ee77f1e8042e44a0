"""Hardware profiles: the few measured rates the planner's models need, as a small JSON file.

A profile is a JSON object with these keys (rates are *achieved* ones, as a benchmark measures them,
not data-sheet peaks; per device = per GPU, or per core on CPUs):

  name               a short name, shown in tables
  about              one line: what was measured, where
  memory_bytes       memory of one device (CPU: of one node, shared by its ranks)
  memory_usable      the fraction a run may fill (allocator slack, CUDA context, fragmentation)
  devices_per_node   ranks one node holds; with Megatron's rank order (tp fastest, then dp, then pp) this
                     decides which groups stay inside a node
  cores_per_node     CPU only: cores shared by a node's ranks (0 for GPUs: each device computes alone)
  parallel_efficiency  CPU only: a GEMM's speed-up on k cores over one core, divided by k (GPUs: 1)
  peak_flops         data-sheet matrix peak in the training dtype: only for the "% of peak" column
  gemm_flops         achieved FLOP/s of large matrix products in bf16/fp16 (CPU: float32, one core)
  gemm_flops_fp32    the same for fp32 training (GPUs: TF32 or FP32 units)
  gemm_k_half        the inner dimension k at which a product runs at half those rates: a product of
                     inner dimension k runs at rate·k/(k + gemm_k_half) (CPU BLAS packs its operands
                     per product; 0: no such loss, as the roofline covers GPUs)
  memory_bandwidth   achieved bytes/s of elementwise kernels streaming arrays from memory
  cache_bytes        arrays up to this size run at cache_bandwidth instead (0: no such level)
  cache_bandwidth    achieved bytes/s of elementwise kernels on arrays that fit in cache_bytes
  transcendental_rate  elements/s of exp and tanh (0: they cost what a memory pass costs, as on GPUs)
  scatter_rate       elements/s of an embedding-gradient scatter-add (0: a memory pass)
  kernel_overhead_s  seconds per kernel launch (CPU: per NumPy call)
  kernels            "fused": one read and one write per fused elementwise region, as Megatron's
                     kernels do; "numpy": every pass mpmp's NumPy kernels make (mpmp/nn/functional.py)
  storage            "native": bf16/fp16 values take 2 bytes (a GPU run); "emulated": float32 arrays
                     rounded to the format, as mpmp's NumPy path holds them
  overlap            share of non-blocking communication that progresses while the rank computes
                     (1 with NCCL's own streams; near 0 for MPI without an asynchronous progress thread)
  intra_node, inter_node   {"latency_s", "bandwidth"}: per-message latency and per-device bus
                     bandwidth (bytes/s, one direction, nccl-tests' busbw) of a link inside / across nodes

`load(name_or_path)` accepts a shipped name (a100, h100, cpu), a name calibrated on this machine
(`python -m mpmp.plan calibrate` writes <config dir>/mpmp/plan/<name>.json, which wins over the shipped
file), or a path to a .json file.
"""

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

from mpmp.errors import ConfigError

SHIPPED = Path(__file__).resolve().parent / "profiles"
KERNELS = ("fused", "numpy")
STORAGE = ("native", "emulated")


@dataclass(frozen=True)
class Link:
    latency_s: float
    bandwidth: float


@dataclass(frozen=True)
class Hardware:
    name: str
    about: str
    memory_bytes: float
    memory_usable: float
    devices_per_node: int
    cores_per_node: int
    parallel_efficiency: float
    peak_flops: float
    gemm_flops: float
    gemm_flops_fp32: float
    gemm_k_half: float
    memory_bandwidth: float
    cache_bytes: float
    cache_bandwidth: float
    transcendental_rate: float
    scatter_rate: float
    kernel_overhead_s: float
    kernels: str
    storage: str
    overlap: float
    intra_node: Link
    inter_node: Link

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("intra_node", "inter_node"):
            out[key] = {"latency_s": out[key].latency_s, "bandwidth": out[key].bandwidth}
        return out


def user_dir() -> Path:
    """Where `calibrate` writes profiles that override the shipped ones."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "mpmp" / "plan"


def names() -> list[str]:
    found = {p.stem for p in SHIPPED.glob("*.json")}
    if user_dir().is_dir():
        found |= {p.stem for p in user_dir().glob("*.json")}
    return sorted(found)


def load(spec: str) -> Hardware:
    """A profile by name or path; ConfigError (one line, with the reason) when it cannot be used."""
    if spec.endswith(".json") or os.sep in spec:
        path = Path(spec)
    else:
        path = next((d / f"{spec}.json" for d in (user_dir(), SHIPPED) if (d / f"{spec}.json").is_file()), None)
        if path is None:
            raise ConfigError(f"--hardware {spec!r} is neither a profile ({', '.join(names())}) nor a .json file")
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--hardware {spec}: cannot read {path} ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--hardware {spec}: {path} is not valid JSON ({exc})") from None
    return from_dict(raw, str(path))


def from_dict(raw: dict, where: str = "profile") -> Hardware:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a profile is a JSON object, not {type(raw).__name__}")
    wanted = {f.name for f in fields(Hardware)}
    missing, unknown = sorted(wanted - set(raw)), sorted(set(raw) - wanted)
    if missing or unknown:
        raise ConfigError(f"{where}: missing keys {missing}, unknown keys {unknown} (see mpmp/plan/hardware.py)")
    values = dict(raw)
    try:
        for key in ("intra_node", "inter_node"):
            values[key] = Link(float(raw[key]["latency_s"]), float(raw[key]["bandwidth"]))
        for f in fields(Hardware):
            if f.type in ("float", float):
                values[f.name] = float(raw[f.name])
            elif f.type in ("int", int):
                values[f.name] = int(raw[f.name])
    except (TypeError, KeyError, ValueError) as exc:
        raise ConfigError(f"{where}: bad value ({exc!r}); numbers, and links as {{latency_s, bandwidth}}") from None
    hw = Hardware(**values)
    _check(hw, where)
    return hw


def _check(hw: Hardware, where: str):
    positive = ("memory_bytes", "gemm_flops", "gemm_flops_fp32", "memory_bandwidth", "peak_flops")
    bad = [k for k in positive if getattr(hw, k) <= 0]
    bad += [k for k in ("intra_node", "inter_node") if getattr(hw, k).bandwidth <= 0 or getattr(hw, k).latency_s < 0]
    if hw.devices_per_node < 1 or not 0 < hw.memory_usable <= 1 or not 0 <= hw.overlap <= 1:
        bad.append("devices_per_node >= 1, 0 < memory_usable <= 1, 0 <= overlap <= 1")
    if hw.kernels not in KERNELS or hw.storage not in STORAGE:
        bad.append(f"kernels in {KERNELS}, storage in {STORAGE}")
    if bad:
        raise ConfigError(f"{where}: invalid {', '.join(bad)}")


def save(hw: Hardware, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(hw.to_dict(), indent=1) + "\n")
    return path
