"""`python -m mpmp.bench {comm,pipeline,train,generate,cp} [options]`: run one benchmark under mpirun.

Each benchmark is a module of this package with a `main(argv)`; it is imported only when chosen, so
one that is missing or broken does not stop the others.
"""

import importlib
import sys

BENCHES = {
    "comm": "collectives and send/recv: mpmp's Group beside raw mpi4py, nccl-tests' busbw",
    "pipeline": "the pipeline engine and its schedules",
    "train": "training steps of a layout",
    "generate": "generation per layout: prefill, decode latency, tokens/s, KV cache vs recomputation",
    "cp": "one long sequence: one rank, tp + SP, and context parallelism (ring attention)",
    "plan": "the planner's predicted step time beside the measured one",
}


def usage() -> str:
    lines = ["usage: mpirun -n N python -m mpmp.bench {" + ",".join(BENCHES) + "} [options]", ""]
    lines += [f"  {name:<10}{what}" for name, what in BENCHES.items()]
    lines += ["", "python -m mpmp.bench NAME --help lists a benchmark's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        print(f"mpmp.bench: unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = f"mpmp.bench.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the benchmark exists but needs something missing: show that error
        print(
            f"mpmp.bench: the {name!r} benchmark is not in this installation ({module_name} is missing)",
            file=sys.stderr,
        )
        return 2
    from mpmp.comm.mpi import abort_on_exception

    abort_on_exception()  # a failure on one rank ends the job instead of hanging the others
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
