"""Read a run's metrics JSONL, its Chrome trace and a plan; any problem is one ReportError line.

Metrics: one object per step from rank 0. A resumed run appends with a new `run_id` and may repeat
steps; the later line of a step counts, and each change of run_id marks a resumption. Non-finite
values are written as null and read as NaN.

Trace: Chrome trace format, pid = rank, tid 0 = compute, tid 1 = communication; ts and dur in
microseconds; the run's description in otherData.mpmp.
"""

import json
import math
from dataclasses import dataclass

from mpmp.errors import MpmpError

TRACE_KEYS = ("run_id", "layout", "schedule", "micro_batches", "virtual_stages", "world", "steps", "memory_per_rank")
PLAN_KEYS = ("step_s", "bubble_fraction", "memory_bytes_per_rank", "comm_bytes_per_step")
MEMORY_KINDS = ("params", "grads", "optimizer", "activations")


class ReportError(MpmpError):
    """A missing, malformed or mismatched input file: one line, exit code 2."""


@dataclass(frozen=True)
class Metrics:
    path: str
    rows: list  # one dict per step, in step order; the later line of a repeated step wins
    run_ids: list  # in the order the launches wrote them
    resumptions: list  # (first step, run_id) of every launch after the first
    first_step: dict  # run_id -> the first step that launch wrote


@dataclass(frozen=True)
class Span:
    rank: int
    tid: int  # 0 compute, 1 communication
    name: str
    cat: str
    start: float  # microseconds
    dur: float
    args: dict

    @property
    def end(self) -> float:
        return self.start + self.dur


@dataclass(frozen=True)
class Trace:
    path: str
    run_id: str
    layout: dict  # tp, pp, dp, cp
    schedule: str
    micro_batches: int
    virtual_stages: int
    world: int
    steps: tuple  # (first, last) traced
    memory: list  # per rank: {"rank", "params", "grads", "optimizer", "activations"} in bytes
    spans: list  # every "X" event as a Span


def _open_text(path: str, what: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise ReportError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ReportError(f"{what} {path} is not a text file") from None


def _json(text: str, where: str):
    # NaN/Infinity tokens are accepted as well as null, so an older writer's lines still read.
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def _number(value, where: str = "") -> float:
    if value is None:
        return math.nan
    if not isinstance(value, (int, float)):  # bool is an int: skipped counts as 0 or 1
        raise ReportError(f"{where}: {value!r} is not a number")
    return float(value)


def _metrics_line(text: str, where: str) -> dict:
    obj = _json(text, where)
    if not isinstance(obj, dict):
        raise ReportError(f"{where}: a metrics line must be a JSON object")
    step, run_id = obj.get("step"), obj.get("run_id")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ReportError(f"{where}: 'step' must be a positive integer, not {step!r}")
    if not isinstance(run_id, str):
        raise ReportError(f"{where}: 'run_id' must be a string, not {run_id!r} (metrics from an older mpmp?)")
    return obj


def read_metrics(path: str) -> Metrics:
    by_step, run_ids, resumptions, first_step = {}, [], [], {}
    for n, text in enumerate(_open_text(path, "metrics").splitlines(), 1):
        if not text.strip():
            continue
        line = _metrics_line(text, f"metrics {path} line {n}")
        run_id = line["run_id"]
        if run_ids and run_id != run_ids[-1]:
            resumptions.append((line["step"], run_id))
        if not run_ids or run_id != run_ids[-1]:
            run_ids.append(run_id)
        first_step.setdefault(run_id, line["step"])
        by_step[line["step"]] = line
    if not by_step:
        raise ReportError(f"metrics {path} holds no steps")
    rows = [by_step[k] for k in sorted(by_step)]
    return Metrics(path, rows, run_ids, resumptions, first_step)


def _span(event: dict, where: str) -> Span:
    try:
        pid, tid, ts, dur = (event[k] for k in ("pid", "tid", "ts", "dur"))
        args = event.get("args") if isinstance(event.get("args"), dict) else {}
        return Span(int(pid), int(tid), str(event["name"]), str(event.get("cat", "")), float(ts), float(dur), args)
    except KeyError as exc:
        raise ReportError(f"{where}: an 'X' event has no {exc.args[0]!r}") from None
    except (TypeError, ValueError):
        raise ReportError(f"{where}: an 'X' event has a non-numeric pid, tid, ts or dur") from None


def _trace_info(obj, where: str) -> dict:
    info = obj.get("otherData", {}).get("mpmp") if isinstance(obj.get("otherData"), dict) else None
    if not isinstance(info, dict):
        raise ReportError(f"{where} has no otherData.mpmp (not a trace from python -m mpmp.train --trace?)")
    missing = [k for k in TRACE_KEYS if k not in info]
    if missing:
        raise ReportError(f"{where}: otherData.mpmp lacks {', '.join(missing)}")
    steps = info["steps"]
    if not (isinstance(steps, list) and len(steps) == 2 and all(isinstance(s, int) for s in steps)):
        raise ReportError(f"{where}: otherData.mpmp.steps must be [first, last], not {steps!r}")
    return info


def read_trace(path: str) -> Trace:
    where = f"trace {path}"
    obj = _json(_open_text(path, "trace"), where)
    if not isinstance(obj, dict) or not isinstance(obj.get("traceEvents"), list):
        raise ReportError(f"{where} has no traceEvents list (not a Chrome trace)")
    info = _trace_info(obj, where)
    events = [e for e in obj["traceEvents"] if isinstance(e, dict) and e.get("ph") == "X"]
    try:
        layout = {k: int(info["layout"].get(k, 1)) for k in ("tp", "pp", "dp", "cp")}
        numbers = {k: int(info[k]) for k in ("micro_batches", "virtual_stages", "world")}
    except (AttributeError, TypeError, ValueError):
        raise ReportError(
            f"{where}: otherData.mpmp's layout, micro_batches, virtual_stages or world is not a number"
        ) from None
    return Trace(
        path=path,
        run_id=str(info["run_id"]),
        layout=layout,
        schedule=str(info["schedule"]),
        **numbers,
        steps=tuple(info["steps"]),
        memory=_memory_rows(info["memory_per_rank"], f"{where}: otherData.mpmp.memory_per_rank"),
        spans=[_span(e, where) for e in events],
    )


def _memory_rows(rows, where: str) -> list:
    """[{rank, params, grads, optimizer, activations}] in rank order, values as floats."""
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ReportError(f"{where} must be a list of objects")
    try:
        out = [{"rank": int(r["rank"]), **{k: _number(r[k], where) for k in MEMORY_KINDS}} for r in rows]
    except KeyError as exc:
        raise ReportError(f"{where}: an entry has no {exc.args[0]!r}") from None
    except (TypeError, ValueError):
        raise ReportError(f"{where}: an entry has a non-integer rank") from None
    return sorted(out, key=lambda r: r["rank"])


def series(metrics: Metrics, key: str) -> tuple[list, list]:
    """(steps, values) of one metric; NaN where a line has null or lacks the key."""
    steps = [row["step"] for row in metrics.rows]
    values = [_number(row.get(key), f"metrics {metrics.path} step {row['step']}: {key}") for row in metrics.rows]
    return steps, values


def check_same_run(metrics: Metrics, trace: Trace):
    if trace.run_id not in metrics.run_ids:
        raise ReportError(
            f"trace {trace.path} is from run {trace.run_id}, but metrics {metrics.path} are from "
            f"run {', '.join(metrics.run_ids)}: pass the files of one run"
        )


@dataclass(frozen=True)
class Plan:
    path: str
    step_s: float
    bubble: float
    memory: list  # per rank, as Trace.memory
    comm: object  # a list indexed by rank of {"group:op": bytes}, or one such dict for every rank

    def comm_of(self, rank: int) -> dict:
        return self.comm[rank] if isinstance(self.comm, list) else self.comm


def _plan_layout(entry: dict) -> dict:
    """The layout a plan entry was made for: its "layout" object or top-level tp/pp/dp/cp knobs."""
    source = entry.get("layout") if isinstance(entry.get("layout"), dict) else entry
    return {k: source[k] for k in ("tp", "pp", "dp", "cp") if isinstance(source.get(k), int)}


def _pick_plan(obj, layout: dict | None, where: str) -> dict:
    """A plan of the free layout is a list, best first: take the best one for the run's layout."""
    entries = obj if isinstance(obj, list) else [obj]
    if not entries or not all(isinstance(e, dict) for e in entries):
        raise ReportError(f"{where}: a plan must be a JSON object or a list of them")
    fits = [e for e in entries if all(layout.get(k, v) == v for k, v in _plan_layout(e).items())] if layout else entries
    if not fits:
        shown = " x ".join(f"{k} {v}" for k, v in layout.items())
        raise ReportError(f"{where} holds no plan for the run's layout ({shown})")
    return fits[0]


def _comm_table(value, where: str):
    def valid(d):
        return isinstance(d, dict) and all(isinstance(v, (int, float)) for v in d.values())

    if valid(value) or (isinstance(value, list) and all(valid(d) for d in value)):
        return value
    raise ReportError(f"{where}: comm_bytes_per_step must be {{'group:op': bytes}} or a list of them per rank")


def read_plan(path: str, layout: dict | None = None) -> Plan:
    where = f"plan {path}"
    entry = _pick_plan(_json(_open_text(path, "plan"), where), layout, where)
    missing = [k for k in PLAN_KEYS if k not in entry]
    if missing:
        raise ReportError(f"{where} lacks {', '.join(missing)} (not from python -m mpmp.plan --json?)")
    return Plan(
        path=path,
        step_s=_number(entry["step_s"], f"{where}: step_s"),
        bubble=_number(entry["bubble_fraction"], f"{where}: bubble_fraction"),
        memory=_memory_rows(entry["memory_bytes_per_rank"], f"{where}: memory_bytes_per_rank"),
        comm=_comm_table(entry["comm_bytes_per_step"], where),
    )
