"""The optimizer over a rank's flat buffers: replicated AdamW, or ZeRO-1 (arXiv 1910.02054 §5.1).

ZeRO-1 (stage 1, optimizer-state partitioning): rank r of the dp group keeps AdamW's state (and, in
mixed precision, the fp32 master weights) only for its slice of each bucket (FlatParams pads buckets
to multiples of dp). Gradients arrive reduce-scattered (optim/grads.py); after the update each bucket
is all-gathered so every replica holds the new weights. Reduce-scatter plus all-gather move the same
bytes as data parallelism's all-reduce (2Ψ(dp-1)/dp per rank) while optimizer memory falls by dp.
Without ZeRO (or with dp = 1) the one range is the whole buffer.
"""

import numpy

from mpmp.backend import array_module, is_device_array, round_to, to_numpy, xp
from mpmp.config import AdamWConfig
from mpmp.optim import clip
from mpmp.optim.adamw import AdamW, runs
from mpmp.optim.buffer import CHUNK

STATE_KINDS = ("m", "v", "master")  # what export_state gives and checkpoints hold, in this order


class Optimizer:
    def __init__(self, flat, hp: AdamWConfig, *, dp_group, norm_groups, zero=False, precision=None):
        """norm_groups: the groups that partition the model (mp = tp x pp); dp is added under ZeRO.
        precision: None (fp32), or "bf16"/"fp16": the model's parameters are kept rounded to that
        format, and fp32 master weights (of this rank's slices) receive the updates."""
        self.flat, self.dp = flat, dp_group
        self.zero = zero and dp_group.size > 1
        if self.zero:
            self.ranges = [b.shard(dp_group.rank, dp_group.size) for b in flat.buckets]
            self.norm_groups = [dp_group] + list(norm_groups)
        else:
            self.ranges = [(0, len(flat))]
            self.norm_groups = list(norm_groups)
        # fp32 parameters are their own master weights (views, updated in place); low-precision
        # parameters get fp32 copies.
        self.precision = precision
        self.mixed = precision is not None
        self.masters = [
            flat.data[lo:hi].astype(numpy.float32) if self.mixed else flat.data[lo:hi] for lo, hi in self.ranges
        ]
        self.adams = [AdamW(m, flat.decay_mask[lo:hi], hp) for m, (lo, hi) in zip(self.masters, self.ranges)]
        # the runs of parameters this rank counts in the global norm, clipped to its ranges
        self._norm_scratch = (  # the device norm's partial sums (the host needs none)
            array_module(flat.grad).empty(CHUNK, dtype="float64") if is_device_array(flat.grad) else None
        )
        counted = runs(flat.norm_mask)
        self.norm_runs = [(max(a, lo), min(b, hi)) for lo, hi in self.ranges for a, b in counted if a < hi and b > lo]

    def grad_norm(self) -> float:
        """Global L2 norm of the gradient of the distinct parameters, before clipping."""
        sq = clip.local_sq_norm(self.flat.grad, self.norm_runs, self._norm_scratch)
        return clip.all_reduce_norm(sq, self.norm_groups)

    def device_sq_norm(self):
        """The global squared norm as a one-element float64 device array, summed over the norm groups
        on the device: grad_norm without waiting for the GPU."""
        from mpmp.nn.cuda.optim import local_sq_norm

        return clip.all_reduce_sq(
            local_sq_norm(self.flat.grad, self.norm_runs, self._norm_scratch).reshape(1), self.norm_groups
        )

    def step(self, lr: float, grad_scale=1.0, *, skip=None):
        """AdamW on this rank's (slices of the) parameters with grads * grad_scale (clipping, and
        undoing the loss scale). On a device grad_scale may be a float32 [1] device array and skip an
        int32 flag that vetoes the update (see undo_step)."""
        for adam, master, (lo, hi) in zip(self.adams, self.masters, self.ranges):
            adam.step(self.flat.grad[lo:hi], lr, grad_scale, skip=skip)
            if self.mixed:
                self._store(master, lo, hi)
        if self.zero:
            for b, (lo, hi) in zip(self.flat.buckets, self.ranges):
                # straight into the flat buffer (MPI needs the send slice apart from the output)
                self.dp.all_gather(self.flat.data[lo:hi].copy(), out=self.flat.data[b.lo : b.hi])

    def _store(self, master, lo, hi):
        """Updated fp32 master weights into the model's parameters, in their format: on a device a
        cast into the 16-bit storage; on NumPy float32 values rounded to the format's grid."""
        if is_device_array(self.flat.data) and self.flat.data.dtype != numpy.float32:
            from mpmp.nn.cuda.elementwise import cast

            cast(master, self.flat.data.dtype, out=self.flat.data[lo:hi])
        else:
            self.flat.data[lo:hi] = master
            round_to(self.flat.data[lo:hi], self.precision)

    def undo_step(self):
        """Forget the count of a step the device skipped (its skip flag was set): the update did not
        happen, and AdamW's bias correction counts updates."""
        for adam in self.adams:
            adam.step_count -= 1

    @property
    def steps_taken(self) -> int:
        return self.adams[0].step_count

    def state_bytes(self) -> int:
        """AdamW state, plus master weights where they are copies, held by this rank."""
        extra = sum(m.nbytes for m in self.masters) if self.mixed else 0
        return sum(a.state_bytes() for a in self.adams) + extra

    def export_state(self) -> dict:
        """This rank's state as host arrays: {"step": n, "ranges": [(lo, hi)] of the flat buffer, and
        per kind ("m", "v", and "master" in mixed precision) one array per range}."""
        state = {"step": self.steps_taken, "ranges": list(self.ranges)}
        state["m"] = [to_numpy(a.m) for a in self.adams]
        state["v"] = [to_numpy(a.v) for a in self.adams]
        if self.mixed:
            state["master"] = [to_numpy(m) for m in self.masters]
        return state

    def import_state(self, vectors: dict, step: int):
        """Load state given as whole-buffer vectors in this rank's flat layout ({"m", "v"[, "master"]}:
        arrays of len(flat)); each range takes its slice. A "master" vector is ignored in fp32."""
        for i, (lo, hi) in enumerate(self.ranges):
            self.adams[i].m[...] = xp().asarray(vectors["m"][lo:hi])
            self.adams[i].v[...] = xp().asarray(vectors["v"][lo:hi])
            self.adams[i].step_count = step
            if self.mixed and "master" in vectors:
                self.masters[i][...] = xp().asarray(vectors["master"][lo:hi])
