"""`python -m mpmp.report`: pictures of a run from its metrics, trace and plan files.

Synthetic files written to the spec by one helper (a run of tp 2 x pp 2 x dp 2 with a resumption,
whose step pattern has a bubble of exactly 35%), then real runs of `python -m mpmp.train` (4 ranks
tp 2 x pp 2, and one process) as subprocesses. Each PNG must exist, be a valid PNG of the documented
size and not be blank; the timeline's title (also the PNG's Title text chunk) must state the bubble
of the spans it draws; every bad input ends with one line and exit code 2.
"""

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from mpmp.report import files, steps

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD")
WIDTH, CURVES_HEIGHT, MEMORY_HEIGHT = 1600, 1000, 800  # the documented sizes in pixels


def timeline_height(ranks):
    return 200 + 100 * ranks


# ---- the synthetic run ------------------------------------------------------------------------
# One step of 10 ms, (kind, start, end) in ms from the rank's own step start. Stage 1 starts its step
# 0.5 ms after stage 0, so the picture spans 0 .. 10 ms of stage 0's clock. Busy time: stage 0 has
# 1+1+2+2+1 = 7 ms (the recompute lies inside BW0.0 and counts once), stage 1 has 1+1.5+1+1.5+0.5 = 5.5
# ms inside its 9.5 ms step. Bubble = 1 - (4*7 + 4*5.5) / (8 ranks * 10 ms) = 0.375.
STAGE_COMPUTE = {
    0: [("F0.0", 0, 1), ("F1.0", 1, 2), ("BW0.0", 4, 6), ("recompute", 4, 5), ("BW1.0", 7, 9), ("optimizer", 9, 10)],
    1: [("F0.0", 1, 2), ("BW0.0", 2, 3.5), ("F1.0", 4, 5), ("BW1.0", 5, 6.5), ("optimizer", 9, 9.5)],
}
STAGE_OFFSET = {0: 0.0, 1: 0.5}
STAGE_LENGTH = {0: 10.0, 1: 9.5}
SYNTHETIC_BUBBLE = 0.375
# (name, group, start, end, bytes, blocked ms) per stage; the dp all-reduce is in flight for 3 ms and
# blocks 0.5 ms of it, the pipeline sends 0.1 ms of 1.
STAGE_COMM = {
    0: [
        ("all_reduce", "tp", 2, 2.5, 4096, None),
        ("send", "pp", 1, 2, 2048, 0.1),
        ("recv", "pp", 2.5, 4, 2048, None),
        ("iall_reduce", "dp", 6, 9, 65536, 0.5),
        ("all_reduce", "embed", 9, 9.2, 1024, None),
    ],
    1: [
        ("recv", "pp", 0, 1, 2048, None),
        ("all_reduce", "tp", 3.5, 4, 4096, None),
        ("send", "pp", 3.5, 4.5, 2048, 0.1),
        ("iall_reduce", "dp", 6.5, 8.5, 65536, 0.5),
        ("all_reduce", "embed", 8.5, 8.7, 1024, None),
    ],
}
# bytes per step, all 8 ranks (each rank one operation of each kind); the broadcast before step 3 is no step's
SYNTHETIC_BYTES = {
    "dp:all_reduce": 8 * 65536,
    "embed:all_reduce": 8 * 1024,
    "pp:recv": 8 * 2048,
    "pp:send": 8 * 2048,
    "tp:all_reduce": 8 * 4096,
}
STEP_LENGTHS = {3: 2.0, 4: 1.0, 5: 1.2, 6: 1.1}  # scale of the 10 ms pattern per traced step of run-b
LAYOUT = {"tp": 2, "pp": 2, "dp": 2, "cp": 1}
WORLD = 8


def stage_of(rank):
    return rank // (LAYOUT["tp"] * LAYOUT["dp"])  # Megatron's order: pp varies slowest


def x_event(rank, tid, name, cat, span_ms, args):
    start_ms, end_ms = span_ms
    return {
        "name": name,
        "cat": cat,
        "ph": "X",
        "ts": start_ms * 1e3,
        "dur": (end_ms - start_ms) * 1e3,
        "pid": rank,
        "tid": tid,
        "args": args,
    }


def step_events(rank, k, t0_ms, scale):
    stage = stage_of(rank)
    begin = t0_ms + STAGE_OFFSET[stage] * scale
    out = [x_event(rank, 0, f"step {k}", "step", (begin, begin + STAGE_LENGTH[stage] * scale), {"step": k})]
    for name, a, b in STAGE_COMPUTE[stage]:
        args = {"label": "h.0"} if name == "recompute" else {}
        out.append(x_event(rank, 0, name, "compute", (begin + a * scale, begin + b * scale), args))
    for kind, group, a, b, nbytes, blocked in STAGE_COMM[stage]:
        blocked_us = (b - a if blocked is None else blocked) * scale * 1e3
        args = {"bytes": nbytes, "peer": -1, "seq": 0, "label": "", "dtype": "float32", "blocked_us": blocked_us}
        out.append(x_event(rank, 1, f"{kind} {group}", group, (begin + a * scale, begin + b * scale), args))
    return out


def synthetic_trace(run_id="run-b"):
    events = []
    for rank in range(WORLD):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": "compute"}})
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 1, "args": {"name": "comm"}})
        # before the first traced step: a broadcast that belongs to no step
        events.append(
            x_event(rank, 1, "broadcast world", "world", (1e6 - 5, 1e6 - 4), {"bytes": 10**6, "blocked_us": 1e3})
        )
        t0 = 1e6  # ms since the epoch, as the trainer's wall clock
        for k, scale in STEP_LENGTHS.items():
            events += step_events(rank, k, t0, scale)
            t0 += 10 * scale + 1
    memory = [
        {
            "rank": r,
            "params": 2**20 * (1 + stage_of(r)),
            "grads": 2**20,
            "optimizer": 2**21,
            "activations": 2**19 * (2 - stage_of(r)),
        }
        for r in range(WORLD)
    ]
    info = {
        "run_id": run_id,
        "layout": LAYOUT,
        "schedule": "1f1b",
        "micro_batches": 2,
        "virtual_stages": 1,
        "world": WORLD,
        "steps": [3, 6],
        "memory_per_rank": memory,
    }
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"mpmp": info}}


def metrics_line(step, run_id, **over):
    line = {
        "step": step,
        "loss": 5.0 - 0.3 * step,
        "grad_norm": 1.0 / step,
        "lr": 1e-3,
        "step_s": 0.01,
        "tokens_per_s": 1000.0 + step,
        "comm_s": 0.002,
        "loss_scale": 1.0,
        "skipped": False,
        "param_bytes": 2**20,
        "grad_bytes": 2**20,
        "optimizer_bytes": 2**21,
        "activation_bytes": 2**19,
        "run_id": run_id,
    }
    return {**line, **over}


def synthetic_metrics():
    """run-a writes steps 1..4 and dies (step 2 overflowed: grad norm null, skipped); run-b resumes from
    its step-2 checkpoint and writes 3..6, so steps 3 and 4 appear twice and run-b's lines count."""
    first = [metrics_line(k, "run-a") for k in (1, 3, 4)]
    first.insert(1, metrics_line(2, "run-a", grad_norm=None, skipped=True))
    second = [metrics_line(k, "run-b", loss=4.0 - 0.1 * k) for k in (3, 4, 5, 6)]
    return first + second


def synthetic_plan(per_rank=True):
    comm = {"tp:all_reduce": 4096, "pp:send": 2048, "pp:recv": 2048, "dp:all_reduce": 65536, "embed:all_reduce": 1024}
    memory = [
        {"rank": r, "params": 2**20, "grads": 2**20, "optimizer": 2**21, "activations": 2**19} for r in range(WORLD)
    ]
    return {
        "step_s": 0.009,
        "tflops_per_gpu": 0.5,
        "bubble_fraction": 0.25,
        "memory_bytes_per_rank": memory,
        "comm_bytes_per_step": [comm] * WORLD if per_rank else comm,
        "tp": 2,
        "pp": 2,
        "dp": 2,
        "schedule": "1f1b",
        "micro_batches": 2,
    }


def write_run(folder: Path, trace=None, metrics=None, plan=None) -> dict:
    """The three files of the synthetic run in folder; {'metrics': path, 'trace': path, 'plan': path}."""
    paths = {"metrics": folder / "metrics.jsonl", "trace": folder / "trace.json", "plan": folder / "plan.json"}
    lines = synthetic_metrics() if metrics is None else metrics
    paths["metrics"].write_text("".join(json.dumps(line) + "\n" for line in lines))
    paths["trace"].write_text(json.dumps(synthetic_trace() if trace is None else trace))
    paths["plan"].write_text(json.dumps(synthetic_plan() if plan is None else plan))
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture
def run(tmp_path):
    return write_run(tmp_path)


# ---- reading the pictures back --------------------------------------------------------------------
def png_chunks(path) -> dict:
    """{'IHDR': (width, height), 'text': {key: value}} of a PNG whose every chunk's CRC is right."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, out = 8, {"text": {}}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in {kind}"
        if kind == b"IHDR":
            out["IHDR"] = struct.unpack(">II", body[:8])
        elif kind == b"tEXt":
            key, value = body.split(b"\0", 1)
            out["text"][key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + length
        if kind == b"IEND":
            return out
    raise AssertionError(f"{path} has no IEND chunk")


def assert_picture(path, width, height):
    """A valid PNG of this size whose pixels are not one flat colour (a drawing, not just a title)."""
    import matplotlib.image

    assert png_chunks(path)["IHDR"] == (width, height)
    pixels = matplotlib.image.imread(path)[..., :3]
    not_white = (pixels < 0.95).any(axis=-1).mean()
    assert pixels.std() > 0.05 and not_white > 0.03, (path, pixels.std(), not_white)


def independent_bubble(trace_path, k) -> float:
    """The bubble of step k straight from the trace file, without mpmp.report: 1 - (union of each
    rank's compute spans inside its step span, summed) / (ranks x first start .. last end)."""
    events = [e for e in json.loads(Path(trace_path).read_text())["traceEvents"] if e.get("ph") == "X"]
    own = {e["pid"]: (e["ts"], e["ts"] + e["dur"]) for e in events if e["cat"] == "step" and e["args"]["step"] == k}
    busy = 0.0
    for rank, (lo, hi) in own.items():
        pieces = sorted(
            (max(e["ts"], lo), min(e["ts"] + e["dur"], hi))
            for e in events
            if e["pid"] == rank and e["cat"] == "compute" and e["ts"] < hi and e["ts"] + e["dur"] > lo
        )
        merged = []
        for a, b in pieces:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        busy += sum(b - a for a, b in merged)
    window = max(hi for _, hi in own.values()) - min(lo for lo, _ in own.values())
    return 1 - busy / (len(own) * window)


def title_of(path) -> str:
    return png_chunks(path)["text"]["Title"]


def title_bubble(text) -> float:
    """The measured bubble stated in a timeline title ('... bubble 37.5% ...'), as a fraction."""
    return float(text.split(", bubble ")[1].split("%")[0]) / 100


def report(*args):
    from mpmp.report.__main__ import main

    return main([str(a) for a in args])


def listed(out) -> dict:
    """{path: caption} from the report's stdout."""
    return dict(line.split(": ", 1) for line in out.splitlines())


# ---- synthetic runs -------------------------------------------------------------------------------
def test_report_writes_each_picture_at_its_documented_size(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "pictures"
    assert report("--metrics", run["metrics"], "--trace", run["trace"], "--plan", run["plan"], "--out", out) == 0
    pictures = listed(capsys.readouterr().out)
    names = {Path(p).name: p for p in pictures}
    assert sorted(names) == ["curves.png", "memory.png", "timeline.png"]
    assert_picture(names["timeline.png"], WIDTH, timeline_height(WORLD))
    assert_picture(names["curves.png"], WIDTH, CURVES_HEIGHT)
    assert_picture(names["memory.png"], WIDTH, MEMORY_HEIGHT)
    for path, caption in pictures.items():
        assert title_of(path) == caption


def test_timeline_title_states_the_bubble_of_its_spans(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert report("--metrics", run["metrics"], "--trace", run["trace"], "--plan", run["plan"], "--out", tmp_path) == 0
    text = title_of(tmp_path / "timeline.png")
    assert text.startswith("step 6: tp 2 x pp 2 x dp 2, 1f1b, 2 micro-batches | step 11.0 ms, bubble 37.5%"), text
    assert "(plan: 9.0 ms, bubble 25.0%)" in text
    assert title_bubble(text) == pytest.approx(independent_bubble(run["trace"], 6), abs=5e-4)


def test_measured_bubble_of_the_synthetic_step_is_known_by_hand(run):
    trace = files.read_trace(run["trace"])
    for k in STEP_LENGTHS:  # the pattern only scales from step to step
        view = steps.step_view(trace, k)
        assert steps.measured_bubble(view) == pytest.approx(SYNTHETIC_BUBBLE)
        assert view.seconds == pytest.approx(STEP_LENGTHS[k] * 10e-3)


def test_busy_time_counts_overlapping_spans_once():
    def span(a, b):
        return files.Span(0, 0, "x", "compute", a, b - a, {})

    assert steps.busy_time([span(0, 4), span(1, 2), span(3, 6), span(8, 9)]) == 7
    assert steps.busy_time([]) == 0


def test_default_step_is_the_median_duration_step_after_warm_up(run):
    trace, metrics = files.read_trace(run["trace"]), files.read_metrics(run["metrics"])
    # run-b's first step (3) is warm-up; of 4 (10 ms), 6 (11 ms) and 5 (12 ms) the median is 6
    assert steps.choose_step(trace, metrics) == 6
    assert steps.choose_step(trace, metrics, 4) == 4


def test_bytes_per_step_count_the_operations_inside_steps_only(run):
    per_rank = steps.bytes_per_step(files.read_trace(run["trace"]))
    assert {key: sum(b) for key, b in per_rank.items()} == SYNTHETIC_BYTES  # the broadcast before step 3 is out


def test_later_line_of_a_repeated_step_counts_and_resumptions_are_found(run):
    metrics = files.read_metrics(run["metrics"])
    assert [row["step"] for row in metrics.rows] == [1, 2, 3, 4, 5, 6]
    assert [row["run_id"] for row in metrics.rows] == ["run-a", "run-a"] + ["run-b"] * 4
    assert metrics.resumptions == [(3, "run-b")]
    _, norms = files.series(metrics, "grad_norm")
    assert math.isnan(norms[1]) and norms[0] == 1.0


def test_a_plan_with_one_comm_table_for_every_rank_equals_the_per_rank_form(tmp_path):
    pytest.importorskip("matplotlib")
    from mpmp.report.memory import planned_bytes

    (tmp_path / "one").mkdir()
    (tmp_path / "each").mkdir()
    one = write_run(tmp_path / "one", plan=synthetic_plan(per_rank=False))["plan"]
    each = write_run(tmp_path / "each", plan=synthetic_plan(per_rank=True))["plan"]
    assert planned_bytes(files.read_plan(one, LAYOUT), WORLD) == SYNTHETIC_BYTES
    assert planned_bytes(files.read_plan(each, LAYOUT), WORLD) == SYNTHETIC_BYTES


def test_a_free_layout_plan_list_gives_the_entry_of_the_runs_layout(tmp_path):
    other = {**synthetic_plan(), "tp": 4, "pp": 1, "step_s": 1.0}
    path = write_run(tmp_path, plan=[other, synthetic_plan()])["plan"]
    assert files.read_plan(path, LAYOUT).step_s == 0.009


def test_without_a_trace_the_curves_and_memory_are_drawn(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert report("--metrics", run["metrics"], "--out", tmp_path / "p") == 0
    pictures = listed(capsys.readouterr().out)
    assert sorted(Path(p).name for p in pictures) == ["curves.png", "memory.png"]
    for path in pictures:
        assert_picture(path, WIDTH, CURVES_HEIGHT if path.endswith("curves.png") else MEMORY_HEIGHT)


# ---- bad inputs -------------------------------------------------------------------------------------
def _break(run, which, text):
    Path(run[which]).write_text(text)


BAD_INPUTS = {
    "missing metrics": (lambda run: os.remove(run["metrics"]), [], "cannot read metrics"),
    "missing trace": (lambda run: os.remove(run["trace"]), [], "cannot read trace"),
    "missing plan": (lambda run: os.remove(run["plan"]), ["--plan", "{plan}"], "cannot read plan"),
    "malformed metrics": (
        lambda run: _break(run, "metrics", '{"step": 1, "run_id": "a"}\n{"step": 2,\n'),
        [],
        "line 2: not valid JSON",
    ),
    "metrics line without run_id": (lambda run: _break(run, "metrics", '{"step": 1}\n'), [], "run_id"),
    "metrics value not a number": (
        lambda run: _break(run, "metrics", '{"step": 1, "run_id": "run-b", "loss": "low"}\n'),
        ["--step", "3"],
        "'low' is not a number",
    ),
    "malformed trace": (lambda run: _break(run, "trace", '{"traceEvents": ['), [], "not valid JSON"),
    "trace without otherData": (lambda run: _break(run, "trace", '{"traceEvents": []}'), [], "otherData.mpmp"),
    "malformed plan": (lambda run: _break(run, "plan", "[1, 2"), ["--plan", "{plan}"], "not valid JSON"),
    "plan without step_s": (
        lambda run: _break(run, "plan", json.dumps({"bubble_fraction": 0.1})),
        ["--plan", "{plan}"],
        "step_s",
    ),
    "trace of another run": (
        lambda run: _break(run, "trace", json.dumps(synthetic_trace("run-c"))),
        [],
        "from run run-c",
    ),
    "step outside the trace": (lambda run: None, ["--step", "2"], "step 2 is not in trace"),
    "step never traced": (lambda run: None, ["--step", "99"], "holds steps 3..6"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_a_bad_input_is_one_line_and_exit_code_2(case, run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    spoil, extra, needle = BAD_INPUTS[case]
    spoil(run)
    extra = [a.format(**run) for a in extra]
    code = report("--metrics", run["metrics"], "--trace", run["trace"], *extra, "--out", tmp_path / "p")
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "p" / "timeline.png").exists()


def test_step_without_a_trace_is_one_line_and_exit_code_2(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert report("--metrics", run["metrics"], "--step", "4", "--out", tmp_path) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--step needs --trace" in err


def test_without_matplotlib_one_line_says_how_to_install_it(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert report("--metrics", run["metrics"], "--out", tmp_path) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "pip install 'mpmp[plot]'" in err


def clean_env():
    """The environment of a plain command, even when pytest itself runs under mpirun."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(("PMI_", "PMIX_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_report(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "mpmp.report", *map(str, args)],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_command_exits_2_with_one_line_for_a_missing_file(tmp_path):
    proc = run_report("--metrics", tmp_path / "nothing.jsonl", "--out", tmp_path)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr


def test_report_starts_no_mpi():
    code = (
        "import sys, mpmp.report.__main__, mpmp.report.files, mpmp.report.steps\n"
        "try:\n    import mpmp.report.timeline, mpmp.report.curves, mpmp.report.memory\nexcept ImportError:\n    pass\n"
        "assert 'mpi4py' not in sys.modules, 'mpmp.report imported mpi4py'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


# ---- real runs (need the trainer's --metrics run_id, --trace otherData and step spans, --trace-steps) --
TINY = ["--d-model", "32", "--layers", "2", "--heads", "2", "--seq-len", "16", "--global-batch", "8"]


def check_real_report(tmp_path, metrics, trace, ranks):
    proc = run_report("--metrics", metrics, "--trace", trace, "--out", tmp_path / "pictures")
    assert proc.returncode == 0, proc.stderr
    pictures = listed(proc.stdout)
    names = {Path(p).name: p for p in pictures}
    assert sorted(names) == ["curves.png", "memory.png", "timeline.png"]
    assert_picture(names["timeline.png"], WIDTH, timeline_height(ranks))
    assert_picture(names["curves.png"], WIDTH, CURVES_HEIGHT)
    assert_picture(names["memory.png"], WIDTH, MEMORY_HEIGHT)
    text = title_of(names["timeline.png"])
    k = int(text.split(":")[0].split()[1])
    assert title_bubble(text) == pytest.approx(independent_bubble(trace, k), abs=5e-4)
    return k


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun is not on PATH")
def test_report_of_a_real_four_rank_tp2_pp2_run(tmp_path):
    metrics, trace = tmp_path / "m.jsonl", tmp_path / "t.json"
    cmd = [
        "mpirun",
        "-n",
        "4",
        sys.executable,
        "-m",
        "mpmp.train",
        "--tp",
        "2",
        "--pp",
        "2",
        "--steps",
        "5",
        *TINY,
        "--metrics",
        metrics,
        "--trace",
        trace,
        "--trace-steps",
        "2:5",
    ]
    proc = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(trace.read_text())["otherData"]["mpmp"]
    assert info["layout"]["tp"] == 2 and info["layout"]["pp"] == 2 and info["steps"] == [2, 5]
    assert check_real_report(tmp_path, metrics, trace, 4) in (2, 3, 4, 5)
    outside = run_report("--metrics", metrics, "--trace", trace, "--step", "1", "--out", tmp_path / "p")
    assert outside.returncode == 2 and len(outside.stderr.splitlines()) == 1, outside.stderr


def test_report_of_a_real_one_process_run(tmp_path):
    metrics, trace = tmp_path / "m.jsonl", tmp_path / "t.json"
    cmd = [sys.executable, "-m", "mpmp.train", "--steps", "3", *TINY, "--metrics", metrics, "--trace", trace]
    proc = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # step 1 is warm-up: the median of steps 2 and 3 is drawn
    assert check_real_report(tmp_path, metrics, trace, 1) in (2, 3)
