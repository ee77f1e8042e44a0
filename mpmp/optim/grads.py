"""Finishing a step's gradients across ranks.

1. Data parallelism: each bucket of the flat gradient buffer is summed over the dp group (the loss is
   already the mean over the global batch, so replicas' gradients add) as soon as every parameter in
   it has its final gradient: a non-blocking all-reduce, overlapped with the rest of backward. Under
   ZeRO-1 the bucket is reduce-scattered instead (blocking, at the same moment): each rank receives
   the sum of its own slice.
2. The tied embedding: the first stage's and the last stage's copies of wte each hold part of the
   gradient; an all-reduce over the embedding group {first, last} makes both the total.
3. Sequence parallelism: replicated tensors used on sequence shards (LayerNorms, row-parallel biases,
   wpe) hold partial sums; one all-reduce over tp completes them.
2 and 3 must precede the data-parallel reduction of those parameters, so they live in the late
bucket, reduced only in finish().
"""

from collections import Counter


class GradReducer:
    def __init__(self, flat, *, dp_group, tp_group, embed_group, zero=False, tied=None, sp_params=(), modules=()):
        """tied: this rank's copy of the tied embedding when pp > 1. sp_params: the sequence-parallel
        partial sums. modules: every module on this rank (a parameter is final once all modules using
        it are done)."""
        self.flat, self.dp, self.tp, self.embed = flat, dp_group, tp_group, embed_group
        self.zero = zero and dp_group.size > 1
        self.tied = tied if embed_group.size > 1 else None
        self.sp_params = list(sp_params) if tp_group.size > 1 else []
        self.bucket_of = {id(p): i for i, b in enumerate(flat.buckets) for p in b.params}
        self.uses = Counter(id(p) for m in modules for p in m.parameters())
        self.start_step()

    def start_step(self):
        self.remaining_uses = dict(self.uses)
        self.remaining = [len(b.params) for b in self.flat.buckets]
        self.handles = {}

    def module_done(self, module):
        """Backward of `module` finished for the last micro-batch of the step."""
        for p in module.parameters():
            self.remaining_uses[id(p)] -= 1
            if self.remaining_uses[id(p)] == 0:
                i = self.bucket_of[id(p)]
                self.remaining[i] -= 1
                if self.remaining[i] == 0 and not self.flat.buckets[i].late:
                    self._launch(i)

    def _launch(self, i):
        if self.dp.size == 1 or i in self.handles:
            return
        b = self.flat.buckets[i]
        grad = self.flat.grad[b.lo : b.hi]
        if self.zero:
            lo, hi = b.shard(self.dp.rank, self.dp.size)
            self.flat.grad[lo:hi] = self.dp.reduce_scatter(grad)
            self.handles[i] = None
        else:
            self.handles[i] = self.dp.iall_reduce(grad)

    def finish(self):
        """Complete every reduction of the step (before the optimizer)."""
        if self.sp_params:
            lo = self.flat.span(self.sp_params[0])[0]
            hi = sum(self.flat.span(self.sp_params[-1]))
            self.tp.all_reduce(self.flat.grad[lo:hi], exact=True)  # gradients stay fp32
        if self.tied is not None:
            self.embed.all_reduce(self.tied.grad.reshape(-1))
        for i in range(len(self.flat.buckets)):
            self._launch(i)
        for h in self.handles.values():
            if h is not None:
                h.wait()
        self.start_step()
