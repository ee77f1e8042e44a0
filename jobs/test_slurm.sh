#!/usr/bin/env bash
# CI test of the SLURM templates on a real (one-node, local) SLURM:
#
#   1. jobs/train.sbatch with a tiny model, launched by srun and by mpirun: `sbatch --wait` exits 0,
#      the output holds the summary line and the last checkpoint is there;
#   2. a configuration error in the trainer fails the job (non-zero exit code, the error in the output);
#   3. jobs/bench.sbatch runs the communication benchmark;
#   4. preemption: a longer job gets `scancel --signal=USR1` once it has written a checkpoint; it must
#      save, exit 75, requeue itself, resume and finish, with every step in its metrics file once;
#   5. a crash: a job killed with SIGKILL after its first periodic checkpoint, requeued by hand, must
#      resume from that checkpoint (the batch script first clears the shared memory the killed MPICH
#      left behind, or the new ranks would hang in MPI_Init);
#   6. an uninterrupted run with the same flags (plain mpirun, outside SLURM) must reach the same losses
#      as 4 and 5 (1e-6 relative; resuming is bit-exact with the same layout, so they are equal).
#
#   bash jobs/test_slurm.sh          (as root on Debian/Ubuntu: installs slurm-wlm and munge if missing)
#
# Run it from the environment that has mpmp's dependencies (numpy, mpi4py, an MPI with mpirun), e.g.
# `. .venv/bin/activate`: the jobs inherit it. The cluster is started with jobs/local_slurm.sh and
# stopped on exit, whatever happens; the files of a failed run stay in $MPMP_SLURM_TEST_DIR (default
# a new folder under /tmp) for a look. About 90 s on 2 cores (the install adds what apt takes).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
WORK=${MPMP_SLURM_TEST_DIR:-$(mktemp -d /tmp/mpmp-slurm-test.XXXXXX)}
mkdir -p "$WORK"
RANKS=4
# --lr-schedule constant: the loss of step k then does not depend on --steps (test 5 vs the reference).
TINY=(--d-model 32 --layers 2 --heads 2 --seq-len 16 --global-batch 8 --tp 2 --pp 2 --lr-schedule constant)
LONG_STEPS=${MPMP_SLURM_TEST_STEPS:-1500}
CRASH_STEPS=400
T0=$SECONDS
# One BLAS thread per rank, as the jobs have (train.sbatch: --cpus-per-task=1), also for the reference
# run: another thread count may sum in another order, and more threads than cores slow everything.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 BLIS_NUM_THREADS=1

say() { echo "test_slurm [$((SECONDS - T0))s]: $*"; }
fail() {
    echo "test_slurm [$((SECONDS - T0))s]: FAIL: $*" >&2
    exit 1
}

cleanup() {
    local rc=$?
    trap - EXIT
    say "stopping the local cluster (and removing the shared memory its killed MPI steps left)"
    bash "$REPO/jobs/local_slurm.sh" stop || true
    if [ "$rc" -eq 0 ]; then
        rm -rf "$WORK"
        say "PASS (${SECONDS}s in all)"
    else
        echo "test_slurm: files of this run: $WORK (cluster logs: ${MPMP_SLURM_DIR:-/tmp/mpmp-slurm}/log)" >&2
    fi
    exit "$rc"
}

# A job's output, indented, for a failure message.
show() {
    echo "---- $1" >&2
    sed 's/^/    /' "$1" >&2 || true
}

# A field of `scontrol show job` (kept for MinJobAge after the end; there is no accounting for sacct).
job_field() {
    scontrol -o show job "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p"
}

# Wait up to $2 seconds for job $1 to reach a final state; prints the state.
wait_final() {
    local job=$1 deadline=$((SECONDS + $2)) state=""
    while [ $SECONDS -lt $deadline ]; do
        state=$(job_field "$job" JobState)
        case "$state" in
            COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | PREEMPTED | BOOT_FAIL | DEADLINE)
                echo "$state"
                return 0
                ;;
        esac
        sleep 1
    done
    echo "${state:-unknown}"
    return 1
}

# Wait up to 120 s for the job to write a checkpoint into $2 (the job must keep running meanwhile).
wait_checkpoint() {
    local job=$1 ckpt=$2 out=$3 deadline=$((SECONDS + 120)) state
    until [ -s "$ckpt/latest" ]; do
        [ $SECONDS -lt $deadline ] || { show "$out"; fail "job $job wrote no checkpoint within 120 s"; }
        state=$(job_field "$job" JobState)
        case "$state" in
            PENDING | RUNNING | CONFIGURING | "") ;;
            *) show "$out"; fail "job $job ended ($state) before the test could interrupt it" ;;
        esac
        sleep 0.5
    done
}

# ---- preflight: the tools the jobs will use -------------------------------------------------------
command -v python >/dev/null || fail "no python on PATH; activate mpmp's environment first"
command -v mpirun >/dev/null || fail "no mpirun on PATH; activate mpmp's environment (pip install -e '.[mpich]')"
python -c "import numpy, mpi4py, mpmp.train" || fail "python cannot import numpy, mpi4py and mpmp from $REPO"
say "repository $REPO, python $(command -v python), work folder $WORK"

# ---- the cluster ----------------------------------------------------------------------------------
bash jobs/local_slurm.sh stop >/dev/null 2>&1 || true # a cluster left over by a killed run
trap cleanup EXIT
trap 'exit 143' TERM # so that cleanup sees a failure, not the status of the last command
trap 'exit 130' INT
bash jobs/local_slurm.sh start
eval "$(bash jobs/local_slurm.sh env)"
say "cluster up"

SB=(sbatch --chdir="$REPO" --nodes=1 --ntasks-per-node="$RANKS" --time=10)

# ---- 1-3. short jobs, two at a time (8 CPUs declared, 4 tasks each) -------------------------------
# `sbatch --wait` in the background: the exit code of each is its job's exit code.
submit_wait() {
    local out=$1
    shift
    timeout 180 "${SB[@]}" --wait --output="$out" "$@" >/dev/null
}

say "1. sbatch --wait jobs/train.sbatch --steps 30, once with MPMP_LAUNCHER=srun and once with mpirun"
pids=()
for launcher in srun mpirun; do
    MPMP_LAUNCHER=$launcher MPMP_CKPT=$WORK/quick-$launcher \
        submit_wait "$WORK/quick-$launcher.out" jobs/train.sbatch --steps 30 "${TINY[@]}" &
    pids+=($!)
done
i=0
for launcher in srun mpirun; do
    out=$WORK/quick-$launcher.out
    rc=0
    wait "${pids[$i]}" || rc=$?
    i=$((i + 1))
    [ "$rc" -eq 0 ] || { show "$out"; fail "the $launcher job exited with code $rc, expected 0"; }
    grep -q "summary: loss" "$out" || { show "$out"; fail "no 'summary: loss' line in $out"; }
    [ "$(cat "$WORK/quick-$launcher/latest" 2>/dev/null)" = step_00000030 ] ||
        fail "no checkpoint of step 30 in $WORK/quick-$launcher"
    say "   ok ($launcher): $(grep -m1 'summary: loss' "$out")"
done

say "2. a configuration error (--tp 3 on $RANKS tasks) must fail the job; 3. jobs/bench.sbatch (comm, small sizes)"
MPMP_CKPT=$WORK/bad-config submit_wait "$WORK/bad-config.out" jobs/train.sbatch --steps 5 --tp 3 &
bad_pid=$!
submit_wait "$WORK/bench.out" jobs/bench.sbatch --max-bytes 65536 --repeats 2 --iters 5 &
bench_pid=$!

out=$WORK/bad-config.out
rc=0
wait "$bad_pid" || rc=$?
# srun reports 137 (MPI_Abort makes slurmstepd kill the step), mpirun the trainer's own code (2).
case "$rc" in
    0 | 75 | 124) show "$out"; fail "the job exited with code $rc, expected the trainer's error" ;;
esac
grep -q "error: world size" "$out" || { show "$out"; fail "no error message in $out"; }
say "   ok: exit code $rc; $(grep -m1 'error:' "$out")"

out=$WORK/bench.out
rc=0
wait "$bench_pid" || rc=$?
[ "$rc" -eq 0 ] || { show "$out"; fail "the benchmark job exited with code $rc"; }
grep -q "all_reduce" "$out" || { show "$out"; fail "no all_reduce row in $out"; }
say "   ok: the benchmark job exited 0 ($(grep -c all_reduce "$out") all_reduce rows)"

# ---- 4. preemption: signal, checkpoint, requeue, resume -------------------------------------------
CKPT=$WORK/preempt
out=$WORK/preempt.out
LONG=(--steps "$LONG_STEPS" --log-every 250 "${TINY[@]}")
say "4. preemption: jobs/train.sbatch ${LONG[*]}"
job=$(MPMP_CKPT=$CKPT MPMP_SAVE_EVERY=100 "${SB[@]}" --parsable --output="$out" jobs/train.sbatch "${LONG[@]}")
job=${job%%;*}
wait_checkpoint "$job" "$CKPT" "$out"
say "   job $job saved $(cat "$CKPT/latest") ($(wc -l <"$CKPT/metrics.jsonl") steps done); scancel --signal=USR1 $job"
# Without --batch or --full, scancel signals the tasks of the job's steps: the python ranks under srun.
scancel --signal=USR1 "$job"

state=$(wait_final "$job" 240) || { show "$out"; fail "job $job not finished after 240 s (state $state)"; }
restarts=$(job_field "$job" Restarts)
say "   job $job: $state, exit code $(job_field "$job" ExitCode), restarts $restarts"
[ "$state" = COMPLETED ] || { show "$out"; fail "job $job ended $state"; }
[ "${restarts:-0}" -ge 1 ] || { show "$out"; fail "job $job was never requeued"; }
grep -q "preempted at step" "$out" || { show "$out"; fail "the trainer did not report a preemption"; }
grep -q "requeueing job $job" "$out" || { show "$out"; fail "the batch script did not requeue the job"; }
grep -q "resumed from" "$out" || { show "$out"; fail "the requeued job did not resume from the checkpoint"; }
say "   $(grep -m1 'preempted at step' "$out" | cut -d: -f1); $(grep -m1 'resumed from' "$out")"

# ---- 5. a crash: SIGKILL, requeue by hand, resume from the periodic checkpoint ---------------------
CRASH_CKPT=$WORK/crash
out=$WORK/crash.out
say "5. crash: jobs/train.sbatch --steps $CRASH_STEPS, killed after its first checkpoint, then requeued"
job=$(MPMP_CKPT=$CRASH_CKPT MPMP_SAVE_EVERY=100 "${SB[@]}" --parsable --output="$out" \
    jobs/train.sbatch --steps "$CRASH_STEPS" --log-every 100 "${TINY[@]}")
job=${job%%;*}
wait_checkpoint "$job" "$CRASH_CKPT" "$out"
say "   job $job saved $(cat "$CRASH_CKPT/latest"); scancel --signal=KILL $job"
scancel --signal=KILL "$job"
state=$(wait_final "$job" 60) || { show "$out"; fail "job $job still $state 60 s after SIGKILL"; }
say "   job $job: $state; scontrol requeue $job"
scontrol requeue "$job"
sleep 1
state=$(wait_final "$job" 180) || { show "$out"; fail "requeued job $job not finished after 180 s (state $state)"; }
[ "$state" = COMPLETED ] || { show "$out"; fail "requeued job $job ended $state"; }
grep -q "resumed from" "$out" || { show "$out"; fail "the requeued job did not resume from the checkpoint"; }
say "   ok: $(grep -m1 'resumed from' "$out")"
grep -h "removed /dev/shm" "$out" | sed 's/^/   /' || true

# ---- 6. the same losses as an uninterrupted run ---------------------------------------------------
# The reference runs after the jobs, not beside them: MPICH's ranks poll while they wait, and twice as
# many ranks as cores would slow both runs several times over.
say "6. the uninterrupted reference: mpirun -n $RANKS python -m mpmp.train ${LONG[*]} (outside SLURM)"
rc=0
timeout -k 10 240 mpirun -n "$RANKS" python -m mpmp.train "${LONG[@]}" --quiet --metrics "$WORK/reference.jsonl" \
    >"$WORK/reference.out" 2>&1 || rc=$?
[ "$rc" -eq 0 ] || { show "$WORK/reference.out"; fail "the reference run exited with code $rc"; }

python - "$WORK/reference.jsonl" "$LONG_STEPS" "$CKPT/metrics.jsonl" "$CRASH_STEPS" "$CRASH_CKPT/metrics.jsonl" <<'EOF' ||
import json, sys

ref = {m["step"]: m["loss"] for m in map(json.loads, open(sys.argv[1]))}
long_steps, crash_steps = int(sys.argv[2]), int(sys.argv[4])
preempted = [json.loads(line) for line in open(sys.argv[3])]
crashed = [json.loads(line) for line in open(sys.argv[5])]
# The preempted step is logged and saved, and the requeued run continues after it: every step once.
numbers = [m["step"] for m in preempted]
if numbers != list(range(1, long_steps + 1)):
    dup = sorted({n for n in numbers if numbers.count(n) > 1})
    sys.exit(f"preempted job: metrics steps are not 1..{long_steps} once each "
             f"({len(numbers)} lines; repeated: {dup[:5]})")
bad = []
for name, metrics, step in (("preempted", preempted, long_steps), ("crashed", crashed, crash_steps)):
    last = metrics[-1]
    a, b = last["loss"], ref[step]
    rel = abs(a - b) / max(abs(b), 1e-30)
    print(f"test_slurm: {name} job, loss at step {last['step']}: {a!r}; uninterrupted: {b!r}; "
          f"relative difference {rel:.1e}")
    if last["step"] != step or rel > 1e-6:
        bad.append(name)
if bad:
    sys.exit(f"{' and '.join(bad)}: the final loss differs from the uninterrupted run's (tolerance 1e-6)")
EOF
    fail "a resumed run does not match the uninterrupted one"
say "   ok: preempted and crashed jobs resumed to the uninterrupted run's losses"
