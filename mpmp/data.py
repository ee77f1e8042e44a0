"""Token sources and the documented data order (docs/data.md, a contract).

Sources: `.bin` raw little-endian uint16 (nanoGPT), `.npy` a 1-D integer array, any other file its
bytes (vocabulary 256), and with no path a built-in corpus: the bytes of mpmp's own source code.

Order: the stream t holds N = (len(t) - 1) // S sequences. Step k uses sequences n_j for j = 0..B-1,
with n_j = (k*B + j) mod N in the sequential order, or the (k*B + j) mod N-th entry of a per-epoch
permutation in the shuffled order; input t[n*S : n*S+S], target t[n*S+1 : n*S+S+1]. Data-parallel
replicas and micro-batches take consecutive slices of those B sequences, so no layout changes them;
context-parallel ranks take the positions `context_positions` names of each sequence.
"""

import os
from pathlib import Path

import numpy

from mpmp.cli import fail
from mpmp.errors import DataError

ORDERS = ("sequential", "shuffled")


def context_positions(seq_len: int, cp_rank: int, cp: int) -> numpy.ndarray:
    """The positions of a sequence that context-parallel rank r holds, in its local order: of the
    sequence's 2·cp equal chunks, chunk r then chunk 2·cp - 1 - r (comm/grid.context_chunks). Its
    inputs, targets and position embeddings are those positions'."""
    from mpmp.comm.grid import context_chunks

    c = seq_len // (2 * cp)
    return numpy.concatenate([numpy.arange(j * c, (j + 1) * c) for j in context_chunks(cp_rank, cp)])


def builtin_corpus() -> numpy.ndarray:
    """The bytes of mpmp's Python sources, in sorted path order: always there, no download."""
    root = Path(__file__).resolve().parent
    chunks = [p.read_bytes() for p in sorted(root.rglob("*.py"))]
    return numpy.frombuffer(b"\n".join(chunks), dtype=numpy.uint8)


def load_tokens(path: str | None) -> tuple[numpy.ndarray, int]:
    """(tokens, natural vocabulary size of the format) for a path, or the built-in corpus for None."""
    if path is None:
        return builtin_corpus(), 256
    if not os.path.exists(path):
        raise DataError(f"data file {path} does not exist")
    if os.path.isdir(path):
        raise DataError(f"data file {path} is a directory, not a token file")
    tokens, vocab = _read_tokens(path)
    if tokens.size == 0:
        raise DataError(f"{path}: the file holds no tokens")
    return tokens, vocab


def _read_tokens(path: str) -> tuple[numpy.ndarray, int]:
    """(tokens, natural vocabulary) of an existing file, by its suffix (docs/data.md)."""
    try:
        if path.endswith(".bin"):
            size = os.path.getsize(path)
            if size % 2:
                raise DataError(f"{path}: a .bin token file holds uint16 tokens, but its size ({size} bytes) is odd")
            if size == 0:
                return numpy.zeros(0, dtype="<u2"), 0  # memmap cannot map an empty file
            tokens = numpy.memmap(path, dtype="<u2", mode="r")
            return tokens, int(tokens.max()) + 1
        if path.endswith(".npy"):
            tokens = numpy.load(path, mmap_mode="r", allow_pickle=False)
            if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
                raise DataError(
                    f"{path}: a .npy token file must be a 1-D integer array, not {tokens.ndim}-D {tokens.dtype}"
                )
            if tokens.size and int(tokens.min()) < 0:
                raise DataError(f"{path}: token ids must not be negative (found {int(tokens.min())})")
            return tokens, int(tokens.max()) + 1 if tokens.size else 0
        return numpy.fromfile(path, dtype=numpy.uint8), 256
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read tokens ({exc})") from None


class TokenData:
    """A token stream cut into sequences of length S, served in docs/data.md's order."""

    def __init__(self, tokens, seq_len: int, vocab: int, order="sequential", seed=0, name="data"):
        if order not in ORDERS:
            raise DataError(f"--data-order must be one of {', '.join(ORDERS)}, not {order!r}")
        self.tokens, self.seq_len, self.order, self.seed = tokens, seq_len, order, seed
        self.num_sequences = (len(tokens) - 1) // seq_len if len(tokens) > 0 else 0
        if self.num_sequences < 1:
            raise DataError(
                f"{name}: {len(tokens)} tokens are too few for one sequence of length {seq_len} "
                f"(need at least {seq_len + 1})"
            )
        top = int(numpy.max(tokens))
        if top >= vocab:
            raise DataError(f"{name}: token id {top} is not below the vocabulary size {vocab} (--vocab)")
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch):
        if epoch != self._perm_epoch:
            rng = numpy.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.num_sequences), epoch
        return self._perm

    def sequence_indices(self, step: int, global_batch: int) -> numpy.ndarray:
        """The n_j of step k (0-based), j = 0..B-1."""
        g = step * global_batch + numpy.arange(global_batch, dtype=numpy.int64)
        if self.order == "sequential":
            return g % self.num_sequences
        out = numpy.empty(global_batch, dtype=numpy.int64)
        epochs, pos = g // self.num_sequences, g % self.num_sequences
        for e in numpy.unique(epochs):
            sel = epochs == e
            out[sel] = self._permutation(int(e))[pos[sel]]
        return out

    def batch(self, step: int, global_batch: int, first: int = 0, count: int | None = None):
        """(inputs, targets), each [count, S] int64, for sequences first..first+count-1 of step k."""
        count = global_batch - first if count is None else count
        n = self.sequence_indices(step, global_batch)[first : first + count]
        s = self.seq_len
        rows = (n * s)[:, None] + numpy.arange(s + 1)[None, :]
        window = numpy.asarray(self.tokens[rows], dtype=numpy.int64)
        return window[:, :-1], window[:, 1:]

    def replica_batch(self, step: int, global_batch: int, dp_rank: int, dp: int):
        """This data-parallel replica's consecutive share of the step's B sequences."""
        share = global_batch // dp
        return self.batch(step, global_batch, dp_rank * share, share)


# ---------------------------------------------------------------------------------------------
# python -m mpmp.data prepare: text -> a nanoGPT-style .bin token file
# ---------------------------------------------------------------------------------------------

UINT16_VOCAB = 2**16  # a .bin file holds uint16 tokens: ids 0 .. 65535


def prepare(src: str, dst: str, tokenizer_path: str | None = None) -> int:
    """Tokenize the UTF-8 text file src and write its ids to dst as little-endian uint16 (docs/data.md's
    .bin format), atomically. Returns the number of tokens."""
    from mpmp.checkpoint import atomic_write_bytes
    from mpmp.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > UINT16_VOCAB:
        raise DataError(
            f"{tokenizer.name}: a vocabulary of {tokenizer.vocab_size} tokens does not fit a .bin file's uint16 "
            f"tokens (at most {UINT16_VOCAB})"
        )
    try:
        with open(src, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{src}: cannot read it as UTF-8 text ({exc})") from None
    ids = numpy.asarray(tokenizer.encode(text), dtype="<u2")
    try:
        atomic_write_bytes(dst, ids.tobytes())
    except OSError as exc:
        raise DataError(f"{dst}: cannot write ({exc.strerror or exc})") from None
    return int(ids.size)


def main(argv=None) -> int:
    import argparse

    from mpmp.errors import MpmpError

    parser = argparse.ArgumentParser(prog="python -m mpmp.data", description="Token files for --data.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize a UTF-8 text file into a .bin file of uint16 tokens (nanoGPT's)")
    p.add_argument("--tokenizer", default=None, help="a Hugging Face tokenizer.json (default: bytes, vocabulary 256)")
    p.add_argument("src", metavar="IN.txt", help="the text to tokenize (UTF-8)")
    p.add_argument("dst", metavar="OUT.bin", help="the token file to write")
    args = parser.parse_args(argv)
    try:
        n = prepare(args.src, args.dst, args.tokenizer)
    except MpmpError as exc:
        return fail(exc)
    print(f"{args.src} -> {args.dst}: {n} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
