"""Pipeline schedules as data (mpmp/pipeline/schedules.py), checked without MPI, and the
`python -m mpmp.schedule` command that draws them."""

import os
import subprocess
import sys

import pytest

from mpmp.errors import ConfigError
from mpmp.pipeline import schedules as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PPS = (1, 2, 3, 4, 8)


def micro_batch_counts(pp):
    return sorted({1, 2, 3, pp, pp + 1, 2 * pp, 2 * pp + 1, 3 * pp})


def configs():
    """(schedule, pp, m, v) for every schedule and size the tests sweep."""
    for pp in PPS:
        for m in micro_batch_counts(pp):
            yield from (("gpipe", pp, m, 1), ("1f1b", pp, m, 1), ("zb-h1", pp, m, 1))
            if pp > 1 and m >= pp:
                yield from (("interleaved", pp, m, 2), ("interleaved", pp, m, 3))


def in_flight_peak(order, done_by):
    """Most micro-batches whose forward has run and whose `done_by` instruction has not."""
    live = peak = 0
    for ins in order:
        live += isinstance(ins, S.Forward) - isinstance(ins, done_by)
        peak = max(peak, live)
    return peak


def programs_of(schedule, pp, m, v=1):
    return [list(p) for p in S.build_all(schedule, pp, m, v)]


def index_of(program, kind, mb, chunk=0):
    return program.index(kind(mb, chunk))


# ---------------------------------------------------------------------------------------------
# Every schedule is complete, matched and deadlock-free
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule,pp,m,v", list(configs()))
def test_every_schedule_passes_the_checker(schedule, pp, m, v):
    programs = S.build_all(schedule, pp, m, v)
    S.check(programs, pp, m, v)
    for program in programs:
        forwards = [(i.mb, i.chunk) for i in program if isinstance(i, S.Forward)]
        grads_done = [(i.mb, i.chunk) for i in program if isinstance(i, (S.Backward, S.BackwardWeight))]
        every = sorted((mb, c) for mb in range(m) for c in range(v))
        assert sorted(forwards) == every and sorted(grads_done) == every


# ---------------------------------------------------------------------------------------------
# The checker rejects broken schedules, naming the rank and the instruction
# ---------------------------------------------------------------------------------------------


def test_checker_rejects_a_missing_recv_forward():
    programs = programs_of("1f1b", 4, 4)
    programs[2].remove(S.RecvForward(1))
    with pytest.raises(S.ScheduleError, match=r"rank 2: Forward\(mb=1, chunk=0\): forward without its input"):
        S.check(programs, 4, 4)


def test_checker_reports_a_missing_send_backward_as_a_deadlock_naming_the_waiting_rank():
    programs = programs_of("1f1b", 4, 4)
    programs[2].remove(S.SendBackward(1))
    with pytest.raises(S.ScheduleError, match=r"deadlock: .*rank 1 waits at RecvBackward\(mb=1, chunk=0\)"):
        S.check(programs, 4, 4)


def test_checker_rejects_a_duplicated_forward():
    programs = programs_of("gpipe", 2, 3)
    i = index_of(programs[0], S.Forward, 2)
    programs[0].insert(i + 1, S.Forward(2))
    with pytest.raises(S.ScheduleError, match=r"rank 0: Forward\(mb=2, chunk=0\): forward computed twice"):
        S.check(programs, 2, 3)


def test_checker_rejects_a_backward_before_its_forward():
    programs = programs_of("1f1b", 4, 4)
    last = programs[3]
    f, b = index_of(last, S.Forward, 0), index_of(last, S.Backward, 0)
    last[f], last[b] = last[b], last[f]
    with pytest.raises(S.ScheduleError, match=r"rank 3: Backward\(mb=0, chunk=0\): backward before its forward"):
        S.check(programs, 4, 4)


def test_checker_rejects_a_weight_gradient_before_its_input_gradient():
    programs = programs_of("zb-h1", 4, 4)
    last = programs[3]
    w = last.pop(index_of(last, S.BackwardWeight, 0))
    last.insert(index_of(last, S.BackwardInput, 0), w)
    with pytest.raises(
        S.ScheduleError, match=r"rank 3: BackwardWeight\(mb=0, chunk=0\): weight gradient before its input-gradient"
    ):
        S.check(programs, 4, 4)


def test_checker_rejects_an_unfinished_micro_batch():
    programs = programs_of("gpipe", 1, 2)
    programs[0].remove(S.Backward(1))
    with pytest.raises(S.ScheduleError, match=r"rank 0: micro-batch 1 chunk 0 is not fully computed"):
        S.check(programs, 1, 2)


# ---------------------------------------------------------------------------------------------
# Orders and memory: warm-up, micro-batches in flight
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pp", PPS)
def test_1f1b_warms_up_with_pp_minus_stage_minus_one_forwards_then_alternates(pp):
    for m in micro_batch_counts(pp):
        for s in range(pp):
            order = S.compute_order("1f1b", pp, m, s)
            w = min(pp - s - 1, m)
            kinds = "".join("F" if isinstance(i, S.Forward) else "B" for i in order)
            assert kinds == "F" * w + "FB" * (m - w) + "B" * w, (pp, m, s)
            assert [i.mb for i in order if isinstance(i, S.Forward)] == list(range(m))
            assert [i.mb for i in order if isinstance(i, S.Backward)] == list(range(m))


@pytest.mark.parametrize("pp", PPS)
def test_1f1b_holds_at_most_pp_minus_stage_micro_batches_in_flight(pp):
    for m in micro_batch_counts(pp):
        for s, program in enumerate(S.build_all("1f1b", pp, m)):
            assert in_flight_peak(program, S.Backward) == min(pp - s, m), (pp, m, s)


@pytest.mark.parametrize("pp", PPS)
def test_gpipe_holds_every_micro_batch_in_flight_on_the_first_stage(pp):
    for m in micro_batch_counts(pp):
        assert in_flight_peak(S.build("gpipe", pp, m, 0), S.Backward) == m


@pytest.mark.parametrize("pp", PPS)
def test_zb_h1_never_holds_more_than_pp_micro_batches_until_their_weight_gradients(pp):
    for m in micro_batch_counts(pp):
        for s, program in enumerate(S.build_all("zb-h1", pp, m)):
            assert in_flight_peak(program, S.BackwardWeight) <= pp, (pp, m, s)
        assert in_flight_peak(S.build("zb-h1", pp, m, 0), S.BackwardWeight) == min(pp, m)


# ---------------------------------------------------------------------------------------------
# Simulated times and bubbles against the papers
# ---------------------------------------------------------------------------------------------


def simulated_bubble(schedule, pp, m, v=1, costs=(1.0, 1.0, 1.0)):
    t_f, t_b, t_w = costs
    return S.bubble_fraction(S.simulate(S.build_all(schedule, pp, m, v), pp, m, v, t_f=t_f, t_b=t_b, t_w=t_w))


def test_simulation_charges_a_fused_backward_b_plus_w_and_a_chunk_one_vth():
    durations = {}
    for schedule, v in (("1f1b", 1), ("zb-h1", 1), ("interleaved", 2)):
        timeline = S.simulate(S.build_all(schedule, 2, 4, v), 2, 4, v, t_f=1.0, t_b=2.0, t_w=4.0)
        for start, end, ins in timeline[0]:
            durations[schedule, type(ins).__name__] = end - start
    assert durations == {
        ("1f1b", "Forward"): 1.0,
        ("1f1b", "Backward"): 6.0,
        ("zb-h1", "Forward"): 1.0,
        ("zb-h1", "BackwardInput"): 2.0,
        ("zb-h1", "BackwardWeight"): 4.0,
        ("interleaved", "Forward"): 0.5,
        ("interleaved", "Backward"): 3.0,
    }


def test_simulation_takes_a_cost_per_stage_and_the_slowest_stage_sets_the_pace():
    """GPipe on 2 stages, m = 3: stage 1 twice as slow. Stage 0's forwards run back to back (0-3);
    stage 1's start at 1 and follow each other: 1-3, 3-5, 5-7."""
    timeline = S.simulate(S.build_all("gpipe", 2, 3), 2, 3, t_f=[1.0, 2.0], t_b=[1.0, 2.0], t_w=0.0)
    forwards = [[(a, b) for a, b, ins in t if isinstance(ins, S.Forward)] for t in timeline]
    assert forwards == [[(0, 1), (1, 2), (2, 3)], [(1, 3), (3, 5), (5, 7)]]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("pp", PPS)
def test_gpipe_and_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(schedule, pp):
    # Unit F, B, W: the fused Backward costs 2. Every op scales alike, so any costs give the same fraction.
    for m in micro_batch_counts(pp):
        expected = (pp - 1) / (m + pp - 1)
        assert S.theoretical_bubble(schedule, pp, m) == pytest.approx(expected)
        assert simulated_bubble(schedule, pp, m) == pytest.approx(expected)
        assert simulated_bubble(schedule, pp, m, costs=(1.0, 2.0, 0.5)) == pytest.approx(expected)


@pytest.mark.parametrize("v", [2, 3])
@pytest.mark.parametrize("pp", [2, 3, 4, 8])
def test_interleaved_bubble_is_p_minus_1_over_vm_plus_p_minus_1(pp, v):
    for m in (pp, 2 * pp, 3 * pp, 2 * pp + 1):
        expected = (pp - 1) / (v * m + pp - 1)
        assert S.theoretical_bubble("interleaved", pp, m, v) == pytest.approx(expected)
        assert simulated_bubble("interleaved", pp, m, v) == pytest.approx(expected), m


@pytest.mark.parametrize("pp", PPS)
def test_zb_h1_bubble_is_p_minus_1_over_3m_plus_p_minus_1(pp):
    for m in (m for m in micro_batch_counts(pp) if m >= pp):
        expected = (pp - 1) / (3 * m + pp - 1)
        assert S.theoretical_bubble("zb-h1", pp, m) == pytest.approx(expected)
        assert simulated_bubble("zb-h1", pp, m) == pytest.approx(expected), m


@pytest.mark.parametrize("pp", [2, 3, 4, 8])
def test_zb_h1_formula_is_only_a_lower_bound_with_fewer_micro_batches_than_stages(pp):
    # The paper's (p-1)/(3m+p-1) assumes m >= p. With one micro-batch the critical path is p forwards,
    # p input-gradient backwards and one W: 2p + 1 for 3 units of work per stage.
    assert simulated_bubble("zb-h1", pp, 1) == pytest.approx(1 - 3 / (2 * pp + 1))
    for m in range(1, pp):
        assert simulated_bubble("zb-h1", pp, m) > S.theoretical_bubble("zb-h1", pp, m)


# ---------------------------------------------------------------------------------------------
# Invalid configurations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule,pp,m,v,message",
    [
        ("pipedream", 4, 8, 1, r"--schedule must be one of gpipe, 1f1b, interleaved, zb-h1, not 'pipedream'"),
        ("interleaved", 4, 8, 1, r"--schedule interleaved needs --virtual-stages of at least 2"),
        ("interleaved", 4, 3, 2, r"--schedule interleaved needs micro-batches \(3\) >= pp \(4\)"),
        ("1f1b", 4, 8, 2, r"--virtual-stages 2 needs --schedule interleaved \(got 1f1b\)"),
        ("zb-h1", 4, 8, 3, r"--virtual-stages 3 needs --schedule interleaved \(got zb-h1\)"),
        ("gpipe", 4, 0, 1, r"micro-batches \(0\) .* must be at least 1"),
    ],
)
def test_invalid_configurations_raise_config_error(schedule, pp, m, v, message):
    with pytest.raises(ConfigError, match=message):
        S.build_all(schedule, pp, m, v)
    with pytest.raises(ConfigError, match=message):
        S.validate(schedule, pp, m, v)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "mpmp.schedule", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_prints_one_row_per_rank_and_the_bubble():
    out = run_cli("--pp", "4", "--micro-batches", "8", "--schedule", "1f1b")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    rows = [line for line in lines if line.startswith("rank ")]
    assert len(rows) == 4
    assert rows[0].split()[2:6] == ["F0", "F1", "F2", "F3"]  # pp - 1 warm-up forwards, then one more
    assert rows[3].split()[2:8] == [".", ".", ".", "F0", "B0", "--"]  # the fused backward spans 2 slots
    assert "bubble: 0.2727 simulated, 0.2727 theoretical (p-1)/(m+p-1)" in lines


def test_cli_labels_interleaved_chunks_and_wraps_to_the_width():
    out = run_cli("--pp", "4", "--micro-batches", "8", "--schedule", "interleaved", "--width", "80")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("rank ")]
    assert len(rows) % 4 == 0 and len(rows) > 4 and max(map(len, rows)) <= 80
    assert rows[0].split()[2:7] == ["F0a", "F1a", "F2a", "F3a", "F0b"]
    assert "bubble: 0.1579 simulated, 0.1579 theoretical (p-1)/(v*m+p-1)" in out.stdout


def test_cli_bad_schedule_exits_2_with_one_error_line():
    out = run_cli("--schedule", "nope")
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.splitlines() == ["error: --schedule must be one of gpipe, 1f1b, interleaved, zb-h1, not 'nope'"]


@pytest.mark.parametrize(
    "args",
    [
        ("--schedule", "interleaved", "--micro-batches", "3"),
        ("--virtual-stages", "2"),
        ("--costs", "1,0,1"),
        ("--pp", "0"),
    ],
)
def test_cli_invalid_arguments_exit_2_without_a_traceback(args):
    from mpmp.schedule import main

    out = run_cli(*args)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("error: ")
    assert main(list(args)) == 2


def test_cli_png_without_matplotlib_is_a_clear_error(monkeypatch, capsys, tmp_path):
    from mpmp.schedule import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(["--png", str(tmp_path / "t.png")]) == 2
    assert capsys.readouterr().err == "error: --png needs matplotlib (pip install matplotlib)\n"


def test_cli_draws_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from mpmp.schedule import main

    path = tmp_path / "timeline.png"
    assert main(["--schedule", "zb-h1", "--png", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
