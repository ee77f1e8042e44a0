"""One contiguous buffer for a rank's parameters and one for their gradients (Megatron's grad buffer).

Parameters are laid out in reverse forward order, the order in which backward finishes their
gradients, and grouped into buckets of about `bucket_bytes`, so data-parallel reductions of whole
buckets can start during backward. Each bucket is padded to a multiple of dp: ZeRO-1 gives rank r the
r-th of dp equal slices of every bucket. Parameters whose gradients need another reduction first
(the tied embedding across the first and last stage, sequence-parallel partial sums) go to a last
"late" bucket that is reduced only after those syncs. Each Parameter's data and grad become views.
"""

from dataclasses import dataclass

from mpmp.backend import array_module

CHUNK = 1 << 16  # elements per pass over a flat buffer (AdamW, the norm): 256 KiB of float32, inside L2


@dataclass
class Bucket:
    lo: int
    hi: int
    params: list
    late: bool

    def shard(self, rank: int, dp: int) -> tuple[int, int]:
        """[lo, hi) of this rank's ZeRO-1 slice of the bucket."""
        k = (self.hi - self.lo) // dp
        return self.lo + rank * k, self.lo + (rank + 1) * k


class FlatParams:
    def __init__(self, params, tp_rank: int = 0, dp: int = 1, bucket_bytes: float = float("inf"), late=()):
        """params: the rank's distinct parameters in forward order. late: parameters that go, in this
        order, into the late bucket."""
        late_params = list(late)
        late_ids = {id(p) for p in late_params}
        ordered = list(reversed(params))
        early = [p for p in ordered if id(p) not in late_ids]
        xp = array_module(ordered[0].data)
        dtype = ordered[0].data.dtype
        itemsize = ordered[0].data.itemsize

        self.params, self.offsets, self.buckets = [], [], []
        n = 0
        for group, is_late in ((early, False), (late_params, True)):
            current, start = [], n
            for i, p in enumerate(group):
                self.params.append(p)
                self.offsets.append(n)
                current.append(p)
                n += p.data.size
                if (n - start) * itemsize >= bucket_bytes or i == len(group) - 1:
                    n = start + -(-(n - start) // dp) * dp  # pad the bucket to a multiple of dp
                    self.buckets.append(Bucket(start, n, current, is_late))
                    current, start = [], n
        self.numel = n
        self.param_elements = sum(p.data.size for p in self.params)  # without bucket padding
        self.data = xp.zeros(n, dtype=dtype)
        self.grad = xp.zeros(n, dtype=dtype)
        self.decay_mask = xp.zeros(n, dtype=dtype)
        self.norm_mask = xp.zeros(n, dtype=xp.float64)
        for p, off in zip(self.params, self.offsets):
            size, shape = p.data.size, p.data.shape
            self.data[off : off + size] = p.data.reshape(-1)
            p.data = self.data[off : off + size].reshape(shape)
            p.grad = self.grad[off : off + size].reshape(shape)
            if p.decay:
                self.decay_mask[off : off + size] = 1
            # Count each distinct tensor once in the global norm (see optim/clip.py).
            if not p.tied_copy and (p.split is not None or tp_rank == 0):
                self.norm_mask[off : off + size] = 1
        self._where = {id(p): (off, p.data.size) for p, off in zip(self.params, self.offsets)}

    def hold_in(self, storage, cast):
        """Hold the parameters in a 16-bit storage dtype from now on (GPUs): a new data buffer made
        by cast(self.data, storage), every parameter's data a view of it. Gradients stay fp32."""
        data = cast(self.data, storage)
        for p, off in zip(self.params, self.offsets):
            p.data = data[off : off + p.data.size].reshape(p.data.shape)
        self.data = data

    def __len__(self):
        return self.data.size

    def span(self, p) -> tuple[int, int]:
        """(offset, size) of a parameter in the buffers."""
        return self._where[id(p)]

    def zero_grad(self):
        self.grad[...] = 0

    def layout(self):
        """[(name, offset, shape)] for checkpoints and resharding."""
        return [(p.name, off, tuple(p.data.shape)) for p, off in zip(self.params, self.offsets)]
