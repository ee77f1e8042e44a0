"""Executes one rank's instruction list (see schedules.py) for one training step.

On MPI, sends are non-blocking (their buffers stay alive until the step ends); receives are posted
where the instruction stands and waited on at once. That is exactly the model the schedule checker
simulates, so a checked schedule cannot deadlock here. On NCCL the program comes from
batching.plan: its Transfers instructions are each one batch_isend_irecv, completed together.
Each instruction kind has its own small method, chosen from a table. Every micro-batch in flight keeps
its own cache; a CacheMeter counts them and their bytes, so tests can assert the memory behaviour of
each schedule and the trainer can report activation memory. Receive buffers come from a BufferPool and
go back to it when their micro-batch is done, so steps after the first allocate none.
"""

from dataclasses import dataclass, field

import numpy

from mpmp.backend import xp
from mpmp.comm import ledger
from mpmp.nn.layers import run_weight_grads
from mpmp.pipeline import schedules as S
from mpmp.pipeline.batching import Transfers


class CacheMeter:
    """Activation caches alive on this rank: a micro-batch's cache lives from its forward until its
    backward (fused) or its weight-gradient pass (split), and the peaks over a step are what the
    schedule costs in memory (GPipe: m caches; 1F1B: at most pp - stage)."""

    def __init__(self, not_activations=()):
        """not_activations: buffers that caches may hold views of but that are no activation memory
        (the flat parameter buffer: LayerNorm keeps a view of its weight)."""
        self._not_activations = {id(b) for b in not_activations}
        self.reset()

    def reset(self):
        self.live = self.peak = 0
        self.live_bytes = self.peak_bytes = 0
        self._bytes = {}

    def add(self, key, cache):
        self._bytes[key] = nbytes(cache, set(self._not_activations))
        self.live += 1
        self.live_bytes += self._bytes[key]
        self.peak = max(self.peak, self.live)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def drop(self, key):
        self.live -= 1
        self.live_bytes -= self._bytes.pop(key)


class BufferPool:
    """Receive buffers kept across steps, by shape and dtype: one goes back (`give`) when the
    micro-batch that received into it is done, and the next receive of that shape takes it again.
    `allocated` and `reused` count what `take` did."""

    def __init__(self):
        self.free = {}
        self.allocated = self.reused = 0

    def take(self, shape, dtype):
        free = self.free.get((tuple(shape), numpy.dtype(dtype)))
        if free:
            self.reused += 1
            return free.pop()
        self.allocated += 1
        return xp().empty(shape, dtype=dtype)

    def give(self, buf):
        self.free.setdefault((buf.shape, buf.dtype), []).append(buf)


@dataclass
class _Step:
    """One step's values in flight, keyed by (micro-batch, chunk)."""

    microbatches: list
    backward_count: list  # per chunk: backwards done (the last one makes its gradients final)
    inputs: dict = field(default_factory=dict)  # received activations
    outputs: dict = field(default_factory=dict)  # activations to send
    grads_in: dict = field(default_factory=dict)  # received output gradients
    grads_out: dict = field(default_factory=dict)  # input gradients to send
    caches: dict = field(default_factory=dict)
    deferred: dict = field(default_factory=dict)  # weight-gradient work of split backwards
    held: dict = field(default_factory=dict)  # pool buffers received for each (mb, chunk)
    sends: list = field(default_factory=list)
    loss: float = 0.0  # a 0-d device array once a device loss is added: summed there, read once


class PipelineEngine:
    def __init__(
        self,
        model,
        group,
        *,
        pp: int,
        stage: int,
        neighbours,
        virtual_stages: int = 1,
        act_shape,
        act_dtype=numpy.float32,
        on_grads_final=None,
        param_buffers=(),
    ):
        """model: this rank's GPT (one chunk per virtual stage). group: the pipeline group (group rank =
        stage). neighbours: (previous, next) stage from the grid (a ring, for interleaving). act_shape:
        the [b, S_local, D] of an activation crossing stages. on_grads_final(module): called when a
        module's gradients are complete for the step (the last micro-batch's backward), so
        data-parallel buckets can start. param_buffers: the parameters' storage, which caches may view
        but which is not activation memory."""
        self.model, self.group = model, group
        self.pp, self.stage, self.v = pp, stage, virtual_stages
        self.prev, self.next = neighbours
        self.act_shape, self.act_dtype = tuple(act_shape), act_dtype
        self.on_grads_final = on_grads_final
        self.meter = CacheMeter(param_buffers)
        self.pool = BufferPool()
        self._handlers = {
            Transfers: self._transfers,
            S.RecvForward: self._recv_forward,
            S.SendForward: self._send_forward,
            S.RecvBackward: self._recv_backward,
            S.SendBackward: self._send_backward,
            S.Forward: self._forward,
            S.Backward: self._backward,
            S.BackwardInput: self._backward,
            S.BackwardWeight: self._backward_weight,
        }

    @property
    def peak_caches(self) -> int:
        return self.meter.peak

    @property
    def peak_bytes(self) -> int:
        return self.meter.peak_bytes

    def tag(self, mb: int, receiver_vs: int, backward: bool) -> int:
        """A tag unique to each message of a step (schedules.check_tag_range keeps it in MPI's range)."""
        return (mb * self.pp * self.v + receiver_vs) * 2 + int(backward)

    def run(self, program, microbatches) -> float:
        """Execute the program; returns the sum of this rank's micro-batch losses (non-zero on the
        last stage only). Every send has completed when it returns."""
        step = _Step(list(microbatches), [0] * len(self.model.chunks))
        self.meter.reset()
        for ins in program:
            self._handlers[type(ins)](ins, step)
        for handle in step.sends:
            handle.wait()
        for key in list(step.held):
            self._release(step, key)
        return step.loss

    # ---- transfers -----------------------------------------------------------------------------
    def _vs(self, ins) -> int:
        return ins.chunk * self.pp + self.stage

    def _send_args(self, ins, step):
        """(array, peer, tag) of a SendForward or SendBackward."""
        key = (ins.mb, ins.chunk)
        if isinstance(ins, S.SendForward):
            return step.outputs.pop(key), self.next, self.tag(ins.mb, self._vs(ins) + 1, False)
        return step.grads_out.pop(key), self.prev, self.tag(ins.mb, self._vs(ins) - 1, True)

    def _recv_args(self, ins, step):
        """(table, pool buffer, peer, tag) of a RecvForward or RecvBackward; the buffer is held for
        the micro-batch until its cache is dropped."""
        key = (ins.mb, ins.chunk)
        buf = self.pool.take(self.act_shape, self.act_dtype)
        step.held.setdefault(key, []).append(buf)
        if isinstance(ins, S.RecvForward):
            return step.inputs, buf, self.prev, self.tag(ins.mb, self._vs(ins), False)
        return step.grads_in, buf, self.next, self.tag(ins.mb, self._vs(ins), True)

    def _recv_forward(self, ins, step):
        table, buf, peer, tag = self._recv_args(ins, step)
        table[ins.mb, ins.chunk] = self.group.recv(buf, peer, tag)

    _recv_backward = _recv_forward

    def _send_forward(self, ins, step):
        step.sends.append(self.group.isend(*self._send_args(ins, step)))

    _send_backward = _send_forward

    def _transfers(self, ins, step):
        """A batch (NCCL): every send and receive in it issued in one group call; all complete."""
        ops, landing = [], {}
        for t in ins.ops:
            if isinstance(t, (S.SendForward, S.SendBackward)):
                ops.append(("send", *self._send_args(t, step)))
            else:
                table, buf, peer, tag = self._recv_args(t, step)
                landing[len(ops)] = (table, (t.mb, t.chunk))
                ops.append(("recv", buf, peer, tag))
        for i, handle in enumerate(self.group.batch_isend_irecv(ops)):
            value = handle.wait()
            if i in landing:
                table, key = landing[i]
                table[key] = value

    def _release(self, step, key):
        for buf in step.held.pop(key, ()):
            self.pool.give(buf)

    # ---- computation ---------------------------------------------------------------------------
    def _forward(self, ins, step):
        key, chunk = (ins.mb, ins.chunk), self.model.chunks[ins.chunk]
        with ledger.get().span(f"F{ins.mb}.{ins.chunk}"):
            y, step.caches[key] = chunk.forward(step.inputs.pop(key, None), step.microbatches[ins.mb])
        self.meter.add(key, step.caches[key])
        if chunk.is_last:
            step.loss += y
        else:
            step.outputs[key] = xp().ascontiguousarray(y)

    def _backward(self, ins, step):
        """Backward (input and weight gradients), or BackwardInput (B only: W is deferred)."""
        key, chunk = (ins.mb, ins.chunk), self.model.chunks[ins.chunk]
        split = isinstance(ins, S.BackwardInput)
        step.backward_count[ins.chunk] += 1
        final = not split and step.backward_count[ins.chunk] == len(step.microbatches)
        wgrad = [] if split else None
        with ledger.get().span(f"{'B' if split else 'BW'}{ins.mb}.{ins.chunk}"):
            dx = chunk.backward(
                step.grads_in.pop(key, None),
                step.caches.pop(key),
                wgrad,
                on_module_done=self.on_grads_final if final else None,
            )
        if split:
            step.deferred[key] = wgrad
        else:
            self.meter.drop(key)
            self._release(step, key)
        if dx is not None:
            step.grads_out[key] = xp().ascontiguousarray(dx)

    def _backward_weight(self, ins, step):
        key, chunk = (ins.mb, ins.chunk), self.model.chunks[ins.chunk]
        with ledger.get().span(f"W{ins.mb}.{ins.chunk}"):
            run_weight_grads(step.deferred.pop(key))
        self.meter.drop(key)
        self._release(step, key)
        last = step.backward_count[ins.chunk] == len(step.microbatches)
        if last and self.on_grads_final and not any(c == ins.chunk for _, c in step.deferred):
            for module in reversed(chunk.modules):
                self.on_grads_final(module)


def nbytes(obj, seen=None) -> int:
    """Bytes of the distinct arrays inside a (nested) cache."""
    seen = set() if seen is None else seen
    if hasattr(obj, "nbytes") and hasattr(obj, "shape"):
        base = obj if getattr(obj, "base", None) is None else obj.base
        if id(base) in seen:
            return 0
        seen.add(id(base))
        return int(base.nbytes) if hasattr(base, "nbytes") else int(obj.nbytes)
    if isinstance(obj, (tuple, list)):
        return sum(nbytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(nbytes(o, seen) for o in obj.values())
    return 0
