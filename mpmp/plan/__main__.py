"""python -m mpmp.plan: memory, communication and step time of a layout, or the best layouts of N devices.

python -m mpmp.plan --tp 2 --pp 2 --gpus 8                          one layout on this machine's profile
python -m mpmp.plan --hardware a100 --gpus 3072 --tp 8 --pp 64 \\
    --vocab 51200 --d-model 25600 --layers 128 --heads 160 --seq-len 2048 --global-batch 3072 \\
    --recompute full --dtype fp16                                     Megatron's 1T row
python -m mpmp.plan --hardware a100 --gpus 64 ... --json            every layout of 64 GPUs, best first
python -m mpmp.plan calibrate [--out FILE]                            measure this machine (see calibrate.py)
"""

import argparse
import json
import sys

from mpmp.cli import fail, number
from mpmp.config import ModelConfig, ParallelConfig, TrainConfig
from mpmp.errors import ConfigError, MpmpError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mpmp.plan",
        description="Plan a training run: memory per rank, communication per step, step time; choose the knobs "
        "left free (micro-batches, schedule, virtual stages) or, with --tp/--pp free, rank every layout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pi, ni, pf = number(int), number(int, True), number(float)
    g = p.add_argument_group("layout (leave out to let the planner choose)")
    g.add_argument("--gpus", type=pi, default=None, help="devices (ranks) in all; default tp*pp when both are given")
    g.add_argument("--tp", type=pi, default=None, help="tensor-parallel ranks")
    g.add_argument("--pp", type=pi, default=None, help="pipeline stages")
    g.add_argument("--schedule", default=None, help="gpipe, 1f1b, interleaved, zb-h1")
    g.add_argument("--virtual-stages", type=pi, default=None, help="model chunks per rank (interleaved)")
    g.add_argument("--micro-batches", type=pi, default=None, help="micro-batches per replica per step")
    g.add_argument("--sequence-parallel", action="store_true", help="shard LayerNorm regions along the sequence")
    g.add_argument("--partition", default="uniform", help="layers to stages: uniform or parameters")
    g.add_argument("--zero", type=ni, default=0, help="1 = ZeRO-1: shard optimizer state over dp")
    g.add_argument("--bucket-mb", type=pf, default=25.0, help="data-parallel gradient bucket size in MiB")
    g.add_argument("--recompute", default="none", help="activation recomputation: none, selective, full")
    m = p.add_argument_group("model (GPT-2) and training")
    m.add_argument("--vocab", type=pi, default=256, help="vocabulary size")
    m.add_argument("--d-model", type=pi, default=128, help="hidden size D")
    m.add_argument("--layers", type=pi, default=4, help="transformer blocks L")
    m.add_argument("--heads", type=pi, default=4, help="attention heads H")
    m.add_argument("--seq-len", type=pi, default=128, help="tokens per sequence S")
    m.add_argument("--global-batch", type=pi, default=16, help="sequences per step B")
    m.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    h = p.add_argument_group("machine and output")
    h.add_argument("--hardware", default="cpu", help="profile name (a100, h100, cpu) or a profile .json file")
    h.add_argument("--software", default="mpmp", help="mpmp, or megatron-2021 (its habits in arXiv 2104.04473)")
    h.add_argument("--top", type=ni, default=20, help="layouts to list with --tp/--pp free (0: all)")
    h.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def request_from(args):
    from mpmp.plan.search import Request
    from mpmp.plan.step_time import SOFTWARE

    if args.software not in SOFTWARE:
        raise ConfigError(f"--software must be one of {', '.join(SOFTWARE)}, not {args.software!r}")
    model = ModelConfig(
        vocab=args.vocab, seq_len=args.seq_len, d_model=args.d_model, layers=args.layers, heads=args.heads
    )
    par = ParallelConfig(
        sequence_parallel=args.sequence_parallel,
        partition=args.partition,
        zero=args.zero,
        bucket_mb=args.bucket_mb,
        recompute=args.recompute,
    )
    cfg = TrainConfig(model=model, parallel=par, global_batch=args.global_batch, seq_len=args.seq_len, dtype=args.dtype)
    gpus = args.gpus
    if gpus is None:
        if not (args.tp and args.pp):
            raise ConfigError("--gpus is needed when --tp or --pp is left for the planner to choose")
        gpus = args.tp * args.pp
    return Request(
        cfg, gpus, args.tp, args.pp, args.schedule, args.virtual_stages, args.micro_batches, SOFTWARE[args.software]
    )


def plan_main(argv) -> int:
    from mpmp.plan import hardware, search, table

    args = build_parser().parse_args(argv)
    req = request_from(args)
    hw = hardware.load(args.hardware)
    _check_options(req)
    plans, rejected = search.search(req, hw)
    sw = req.software
    if req.tp and req.pp:  # one layout: when it does not fit, its numbers all the same, marked
        plan = plans[0] if plans else search.evaluate(rejected[0].closest, hw, sw)
        why = rejected[0].reason if rejected else ""
        if args.json:
            print(json.dumps(table.plan_json(plan, hw, sw, why), indent=1))
        else:
            print(table.render(req, hw, [plan], rejected))
        return 0
    if args.json:
        out = [table.plan_json(p, hw, sw) for p in plans] + [table.rejected_json(r, hw, sw) for r in rejected]
        print(json.dumps(out, indent=1))
    else:
        print(table.render(req, hw, plans, rejected, limit=args.top))
    return 0


def _check_options(req):
    """Refuse option values the search would otherwise silently find no layout for."""
    from mpmp.config import validate_knobs

    validate_knobs(req.cfg)
    if req.tp and req.pp:
        req.cfg.model.validate(req.tp)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["calibrate"]:
            from mpmp.plan import calibrate

            return calibrate.main(argv[1:])
        return plan_main(argv)
    except MpmpError as exc:
        return fail(exc)


if __name__ == "__main__":
    sys.exit(main())
