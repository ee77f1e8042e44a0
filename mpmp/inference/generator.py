"""Generation on any layout: the prompt in one forward (prefill), then one token per step with a KV cache.

Every rank of a model replica runs the same loop: for each step, for each of its micro-batches,

    first stage   token ids (the prompts, then the tokens of the step before) -> its chunk -> send
    middle stage  receive the activation of the new positions -> its chunk -> send
    last stage    receive -> its chunk and the head -> next tokens (sampling.py) -> send to the first

The pipeline is a ring (grid.next_stage of the last stage is the first): the tokens a micro-batch
produced travel back to the first stage, which feeds them in that micro-batch's next step. With m >= pp
micro-batches in flight the stages work at once, the first on micro-batch 1 while the second works on
micro-batch 0, instead of one busy stage and pp - 1 idle ones per token. Under tp every rank of a stage
runs the same loop on its heads and vocabulary columns; the tokens it picks are the same on all of them.

Deadlock freedom: sends are non-blocking, receives blocking, and every rank visits (step, micro-batch)
in the same order; the sends of a step are waited for at the start of the next one, when their
receivers have posted every receive of that step (the first stage receives the last stage's tokens of
step s while it works through step s + 1, which needs nothing from the last stage's step s + 1).
Tags are micro-batch numbers: messages between two ranks arrive in the order sent (MPI's non-overtaking
rule), so the step needs no tag.

Prompts of one length share a micro-batch (no padding: every row's positions and causal mask are
exact); the largest group is halved until there are `micro_batches` (default pp) where prompts allow.
"""

import time
from dataclasses import dataclass

import numpy

from mpmp.backend import xp
from mpmp.inference.kv_cache import KVCache
from mpmp.inference.sampling import GREEDY_SAMPLING, Sampling, VocabShard, next_tokens
from mpmp.pipeline import partition


def inference_model(cfg, source, grid):
    """This rank's chunk of GPT-2 for generation: the stage's units of a uniform split over pp, sharded
    over tp. Nothing is trained, so no gradient buffer is ever made (Parameter.grad is made on use)."""
    from mpmp.model.gpt import GPT

    split = partition.balanced_split(partition.unit_costs(cfg, "uniform"), grid.pp)
    return GPT(cfg, source, ranges=partition.stage_ranges(split, grid.pp, grid.stage), group=grid.tp_group)


def plan_micro_batches(lengths, target: int) -> list[list[int]]:
    """Prompt indices grouped by length (groups in order of first appearance), the largest group
    halved until there are `target` groups or no group has two prompts left."""
    groups = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    out = list(groups.values())
    while out and len(out) < target:  # a replica may have no prompts (fewer prompts than dp)
        big = max(range(len(out)), key=lambda j: len(out[j]))
        if len(out[big]) < 2:
            break
        g = out.pop(big)
        half = (len(g) + 1) // 2
        out[big:big] = [g[:half], g[half:]]
    return out


@dataclass
class _Batch:
    """One micro-batch: its rows' global prompt indices, their tokens so far (the prompts, then what
    the first and last stages learnt) and its KV cache (None when recomputing)."""

    prompts: list
    ids: numpy.ndarray  # [B, prompt_len + generated] int64
    prompt_len: int
    kv: KVCache | None


class Generator:
    """The decode loop of one rank. grid: a ProcessGrid or LocalGrid; model: inference_model's.

    use_cache=False recomputes the whole sequence at every step (a fresh cache per forward): the
    baseline the cache is measured against. After generate(): `kv_bytes` (this rank's caches),
    `started` and `token_times` (perf_counter when each step's tokens were all known on the first
    stage)."""

    def __init__(self, model, grid, *, sampling: Sampling = GREEDY_SAMPLING, use_cache=True, micro_batches=None):
        if len(model.chunks) != 1:
            raise ValueError(f"generation runs one model chunk per rank, not {len(model.chunks)}")
        self.model, self.grid, self.chunk = model, grid, model.chunks[0]
        self.sampling, self.use_cache = sampling, use_cache
        self.target = micro_batches or grid.pp
        cfg = model.cfg
        self.heads, self.head_dim, self.d_model = cfg.heads // grid.tp, cfg.head_dim, cfg.d_model
        self.dtype = self.chunk.parameters()[0].data.dtype
        if self.chunk.is_last:
            head = self.chunk.modules[-1]
            self.shard = VocabShard(head.vocab_start, head.lm.weight.data.shape[0], cfg.vocab)
        self.kv_bytes, self.started, self.token_times, self._batches = 0, 0.0, [], []

    def generate(self, prompts, *, first_index=0, max_new_tokens: int, on_token=None) -> list[list[int]]:
        """prompts: this replica's prompts (lists of token ids), global indices first_index, ...
        Returns each prompt's new tokens on the first and last stages (empty lists elsewhere).
        on_token(prompt_index, token) is called on the first stage as each token arrives."""
        if max_new_tokens < 1:  # the first stage would wait for tokens nobody sends
            raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        groups = plan_micro_batches([len(p) for p in prompts], self.target)
        self._batches = [self._batch(prompts, g, first_index, max_new_tokens) for g in groups]
        self.kv_bytes = sum(b.kv.nbytes for b in self._batches if b.kv is not None)
        self.token_times, self.started = [], time.perf_counter()
        sends = []
        for step in range(max_new_tokens):
            for handle in sends:  # the step before's transfers: their buffers stay alive until here
                handle.wait()
            sends = []
            for mb, b in enumerate(self._batches):
                self._step(mb, b, step, sends, on_token)
        if self.chunk.is_first and not self.chunk.is_last:
            for mb, b in enumerate(self._batches):
                self._receive_tokens(mb, b, on_token)  # the last step's tokens
        for handle in sends:
            handle.wait()
        out = [[] for _ in prompts]
        if self.chunk.is_first or self.chunk.is_last:
            for g, b in zip(groups, self._batches):
                for row, i in enumerate(g):
                    out[i] = b.ids[row, b.prompt_len :].tolist()
        return out

    @property
    def rows(self) -> int:
        """Sequences of the last generate()."""
        return sum(len(b.prompts) for b in self._batches)

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of the last generate() (what prefill took in)."""
        return sum(len(b.prompts) * b.prompt_len for b in self._batches)

    def _batch(self, prompts, group, first_index, max_new_tokens) -> _Batch:
        ids = numpy.array([prompts[i] for i in group], dtype=numpy.int64)
        n = ids.shape[1]
        kv = self._cache(len(group), n + max_new_tokens - 1) if self.use_cache else None
        return _Batch([first_index + i for i in group], ids, n, kv)

    def _cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache.for_chunk(
            self.chunk, batch=batch, capacity=capacity, heads=self.heads, head_dim=self.head_dim, dtype=self.dtype
        )

    def _step(self, mb: int, b: _Batch, step: int, sends: list, on_token):
        """One micro-batch's forward through this rank's chunk at one step, and what follows it."""
        x = self._input(mb, b, step, on_token)
        kv = b.kv if self.use_cache else self._cache(len(b.prompts), b.prompt_len + step)
        y = self.chunk.forward_kv(x, kv)
        group = self.grid.pp_group
        if not self.chunk.is_last:
            sends.append(group.isend(xp().ascontiguousarray(y), self.grid.next_stage, mb))
            return
        tokens = next_tokens(
            y, shard=self.shard, group=self.grid.tp_group, sampling=self.sampling, prompts=b.prompts, step=step
        )
        self._record(b, tokens, on_token if self.chunk.is_first else None)
        if not self.chunk.is_first:
            sends.append(group.isend(tokens, self.grid.next_stage, mb))  # back to the first stage

    def _input(self, mb: int, b: _Batch, step: int, on_token):
        """The new positions this rank's chunk takes: token ids on the first stage, else an activation."""
        new = b.prompt_len if step == 0 else 1
        if not self.use_cache:
            new = b.prompt_len + step  # the whole sequence again
        if not self.chunk.is_first:
            buf = xp().empty((len(b.prompts), new, self.d_model), dtype=self.dtype)
            return self.grid.pp_group.recv(buf, self.grid.prev_stage, mb)
        if step > 0 and not self.chunk.is_last:
            self._receive_tokens(mb, b, on_token)  # the tokens of the step before
        return xp().asarray(b.ids[:, -new:])

    def _receive_tokens(self, mb: int, b: _Batch, on_token):
        tokens = numpy.empty(len(b.prompts), dtype=numpy.int64)
        self._record(b, self.grid.pp_group.recv(tokens, self.grid.prev_stage, mb), on_token)

    def _record(self, b: _Batch, tokens, on_token):
        b.ids = numpy.concatenate([b.ids, numpy.asarray(tokens, dtype=numpy.int64)[:, None]], axis=1)
        if self.chunk.is_first and b is self._batches[-1]:
            self.token_times.append(time.perf_counter())  # every micro-batch's token of this step is here
        if on_token is not None:
            for prompt, token in zip(b.prompts, b.ids[:, -1].tolist()):
                on_token(prompt, token)
