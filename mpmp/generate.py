"""python -m mpmp.generate: text from GPT-2 on any (tp, pp, dp) layout, with a KV cache.

python -m mpmp.generate --init-from model.safetensors --tokenizer tokenizer.json --prompt "Hello"
mpirun -n 4 python -m mpmp.generate --init-from ckpt/ --tp 2 --pp 2 --prompt "a" --prompt "b"

The interface is docs/generate.md. Everything a user can get wrong is checked on every rank before
the first collective; stdout carries only the text, everything else goes to stderr.
"""

import argparse
import json
import statistics
import sys
from dataclasses import dataclass

from mpmp import backend
from mpmp._setup import local_rank, mpi_launched
from mpmp.cli import check_output_file, number
from mpmp.comm import ledger
from mpmp.config import ModelConfig
from mpmp.errors import ConfigError, MpmpError
from mpmp.inference.sampling import Sampling


def _prompt_text(text):
    return ("text", text)


def _prompt_tokens(text):
    """--prompt-tokens 1,2,3 -> ("tokens", [1, 2, 3])."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of token ids") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"token ids must not be negative: {text!r}")
    return ("tokens", ids)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m mpmp.generate",
        description="Generate text with GPT-2 on any tensor/pipeline/data-parallel layout, with a KV cache.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pi, ni, nf = number(int, False), number(int, True), number(float, True)
    m = p.add_argument_group("model")
    m.add_argument(
        "--init-from",
        required=True,
        metavar="SOURCE",
        help="an interchange .npz, an mpmp checkpoint folder, or a Hugging Face GPT-2 model.safetensors",
    )
    m.add_argument(
        "--heads",
        type=pi,
        metavar="H",
        default=None,
        help="attention heads (default: n_head of a config.json beside the safetensors, the checkpoint's, else 4)",
    )
    t = p.add_argument_group("prompts (in the order given; at least one)")
    t.add_argument("--prompt", dest="prompts", action="append", type=_prompt_text, metavar="TEXT", help="a prompt")
    t.add_argument(
        "--prompt-tokens", dest="prompts", action="append", type=_prompt_tokens, metavar="1,2,3", help="token ids"
    )
    t.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="a Hugging Face tokenizer.json (default: bytes, vocabulary 256)",
    )
    s = p.add_argument_group("decoding")
    s.add_argument("--max-new-tokens", type=pi, default=32, help="tokens to generate per prompt")
    s.add_argument("--temperature", type=nf, default=0.0, help="0 = greedy; else sample from softmax(logits/T)")
    s.add_argument("--top-k", type=ni, default=0, help="sample among the k most likely tokens (0 = all)")
    s.add_argument("--top-p", type=float, default=1.0, help="sample within the nucleus of probability p (1 = all)")
    s.add_argument("--seed", type=ni, default=0, help="sampling seed: the same tokens on every layout")
    s.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence at every step")
    o = p.add_argument_group("layout (dp = world size / (tp*pp) replicas share the prompts)")
    o.add_argument("--tp", type=pi, default=1, help="tensor-parallel ranks")
    o.add_argument("--pp", type=pi, default=1, help="pipeline stages")
    o.add_argument("--micro-batches", type=pi, default=None, help="micro-batches per replica (default: pp)")
    o.add_argument("--backend", default="numpy", help="array backend: numpy or cupy")
    f = p.add_argument_group("output")
    f.add_argument("--output", default=None, metavar="FILE.jsonl", help="write one JSON line per prompt, in order")
    f.add_argument("--quiet", action="store_true", help="no layout, timing or communication lines on stderr")
    f.add_argument(
        "--comm-timeout", type=nf, default=600.0, help="seconds an operation may wait before the job aborts (0 = off)"
    )
    return p


@dataclass
class Job:
    """What a launch generates, prepared and checked identically on every rank without communication."""

    cfg: ModelConfig
    weights: dict  # name -> full float32 tensor
    tokenizer: object
    prompts: list  # token id lists, in the order given
    sampling: Sampling
    tp: int
    pp: int
    dp: int


def prepare(args, world_size: int) -> Job:
    from mpmp import weights
    from mpmp.comm.grid import check_layout
    from mpmp.tokenizer import load_tokenizer

    backend.use(args.backend, local_rank())
    dp = check_layout(world_size, args.tp, args.pp)
    if not args.prompts:
        raise ConfigError("give at least one --prompt TEXT or --prompt-tokens 1,2,3")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], not {args.top_p}")
    tokenizer = load_tokenizer(args.tokenizer)
    cfg, arrays = weights.load(args.init_from, args.heads)
    _check_model(cfg, args.tp, args.pp, tokenizer)
    prompts = [tokenizer.encode(v) if kind == "text" else v for kind, v in args.prompts]
    for i, ids in enumerate(prompts):
        _check_prompt(i, ids, cfg, args.max_new_tokens)
    if args.output:
        check_output_file(args.output, "--output")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    return Job(cfg, arrays, tokenizer, prompts, sampling, args.tp, args.pp, dp)


def _check_model(cfg: ModelConfig, tp: int, pp: int, tokenizer):
    cfg.validate(tp)
    if cfg.units < pp:
        raise ConfigError(f"{cfg.layers} layers + embedding + head = {cfg.units} units cannot fill --pp {pp} stages")
    if tokenizer.vocab_size < cfg.vocab:
        raise ConfigError(
            f"the model has {cfg.vocab} tokens but the tokenizer ({tokenizer.name}) only {tokenizer.vocab_size}; "
            "give the model's --tokenizer"
        )


def _check_prompt(i: int, ids: list, cfg: ModelConfig, new: int):
    if not ids:
        raise ConfigError(f"prompt {i + 1} is empty: give at least one token")
    if max(ids) >= cfg.vocab:
        raise ConfigError(f"prompt {i + 1}: token {max(ids)} is not below the model's vocabulary size {cfg.vocab}")
    if len(ids) + new > cfg.seq_len:
        raise ConfigError(
            f"prompt {i + 1}: {len(ids)} tokens + --max-new-tokens {new} = {len(ids) + new} exceed the model's "
            f"context of {cfg.seq_len} positions (wpe rows); shorten the prompt or generate fewer tokens"
        )


def make_grid(job: Job, world_size: int):
    if world_size == 1:
        from mpmp.comm.grid import LocalGrid

        return LocalGrid()
    from mpmp.comm.grid import ProcessGrid

    return ProcessGrid(job.tp, job.pp, job.dp)


def run(job: Job, args, world_size: int) -> int:
    """Build this rank's chunk, generate this replica's share of the prompts, and (rank 0) report."""
    from mpmp.comm.group import block_sizes
    from mpmp.inference.generator import Generator, inference_model

    grid = make_grid(job, world_size)
    ledger.install(ledger.Ledger(grid.rank, keep_events=False))
    model = inference_model(job.cfg, job.weights.__getitem__, grid)
    job.weights = None  # every rank keeps only its shard
    share = block_sizes(len(job.prompts), grid.dp)
    first = sum(share[: grid.coord.dp])
    mine = job.prompts[first : first + share[grid.coord.dp]]
    gen = Generator(
        model, grid, sampling=job.sampling, use_cache=not args.no_kv_cache, micro_batches=args.micro_batches
    )
    stream = _Stream(job.tokenizer, job.prompts[0]) if grid.rank == 0 and len(job.prompts) == 1 else None
    new = gen.generate(mine, first_index=first, max_new_tokens=args.max_new_tokens, on_token=stream)
    holds = gen.chunk.is_first and grid.coord.tp == 0
    mine_out = {"first": first, "tokens": new if holds else None, "kv_bytes": gen.kv_bytes}
    mine_out["ledger"] = ledger.get().summary_rows()
    every = grid.world.all_gather_json(mine_out)
    if grid.rank == 0:
        results = [None] * len(job.prompts)
        for r in every:
            if r["tokens"] is not None:
                results[r["first"] : r["first"] + len(r["tokens"])] = r["tokens"]
        finish(job, args, results, every, gen, stream)
    return 0


class _Stream:
    """With a single prompt, rank 0 (its replica's first stage) prints the text as tokens arrive."""

    def __init__(self, tokenizer, prompt):
        from mpmp.tokenizer import TextStream

        self.text = TextStream(tokenizer, prompt)
        sys.stdout.write(tokenizer.decode(prompt))
        sys.stdout.flush()

    def __call__(self, prompt_index, token):
        sys.stdout.write(self.text.push(token))
        sys.stdout.flush()

    def end(self):
        sys.stdout.write(self.text.flush() + "\n")  # a character the tokens never completed, then a newline


def finish(job: Job, args, results, every, gen, stream):
    """Rank 0: the text on stdout, the JSON lines, and what the run cost on stderr."""
    tok = job.tokenizer
    if stream is not None:
        stream.end()
    else:
        for prompt, new in zip(job.prompts, results):
            sys.stdout.write(tok.decode(prompt) + tok.decode(new) + "\n")
    sys.stdout.flush()
    if args.output:
        with open(args.output, "w") as f:
            for prompt, new in zip(job.prompts, results):
                f.write(json.dumps({"prompt_tokens": prompt, "tokens": new, "text": tok.decode(new)}) + "\n")
    if not args.quiet:
        sys.stderr.write(report(job, every, gen) + "\n")


def report(job: Job, every, gen) -> str:
    """Layout, KV cache bytes, speed (rank 0's replica) and the communication of all ranks."""
    cfg = job.cfg
    kv = [r["kv_bytes"] for r in every]
    lines = [
        f"model: V {cfg.vocab}, S {cfg.seq_len}, D {cfg.d_model}, L {cfg.layers}, H {cfg.heads}; "
        f"layout: tp {job.tp} x pp {job.pp} x dp {job.dp}",
        f"KV cache: {kv[0]:,} bytes on rank 0 (2·L_local·B·H_local·T·hd·4), {sum(kv):,} bytes on all {len(kv)} ranks",
    ]
    times = gen.token_times
    if times:
        prefill = times[0] - gen.started
        line = f"rank 0's replica: {gen.prompt_tokens} prompt tokens prefilled in {prefill * 1e3:.1f} ms"
        steps = [b - a for a, b in zip(times, times[1:])]
        if steps:
            line += f", then {statistics.median(steps) * 1e3:.2f} ms per step (median)"
        lines.append(line + f"; {gen.rows * len(times) / (times[-1] - gen.started):.1f} new tokens/s")
    rows = ledger.merge_rows([[tuple(row) for row in r["ledger"]] for r in every])
    if rows:
        lines.append(ledger.format_summary(rows, title="communication (all ranks)"))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    world_size, rank = 1, 0
    if mpi_launched():
        from mpmp.comm.mpi import MPI, abort_on_exception

        world_size, rank = MPI().COMM_WORLD.Get_size(), MPI().COMM_WORLD.Get_rank()
        if world_size > 1:
            abort_on_exception()
    try:
        job = prepare(args, world_size)  # no communication: every rank finds the same problem
    except MpmpError as exc:
        _fail(exc, rank, world_size)
    from mpmp.comm.watchdog import start_watchdog

    watchdog = start_watchdog(world_size, args.comm_timeout)
    code = run(job, args, world_size)
    if watchdog:
        watchdog.stop()
    return code


def _fail(exc: MpmpError, rank: int, world_size: int):
    """One line per rank, then exit code 2 (aborting peers that may be waiting)."""
    sys.stderr.write(f"rank {rank}: error: {exc}\n")
    if world_size > 1:
        from mpmp.comm.mpi import abort_world

        abort_world(exc.exit_code)
    sys.stderr.flush()
    sys.exit(exc.exit_code)


if __name__ == "__main__":
    sys.exit(main())
