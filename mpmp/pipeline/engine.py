"""Executes one rank's instruction list (see schedules.py) for one training step.

Sends are non-blocking (their buffers stay alive until the step ends); receives are posted where the
instruction stands and waited on at once. That is exactly the model the schedule checker simulates, so
a checked schedule cannot deadlock here. Each instruction kind has its own small method, chosen from a
table. Every micro-batch in flight keeps its own cache; a CacheMeter counts them and their bytes, so
tests can assert the memory behaviour of each schedule and the trainer can report activation memory.
"""

from dataclasses import dataclass, field

import numpy

from mpmp.backend import xp
from mpmp.comm import ledger
from mpmp.nn.layers import run_weight_grads
from mpmp.pipeline import schedules as S


class CacheMeter:
    """Activation caches alive on this rank: a micro-batch's cache lives from its forward until its
    backward (fused) or its weight-gradient pass (split), and the peaks over a step are what the
    schedule costs in memory (GPipe: m caches; 1F1B: at most pp - stage)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.live = self.peak = 0
        self.live_bytes = self.peak_bytes = 0
        self._bytes = {}

    def add(self, key, cache):
        self._bytes[key] = nbytes(cache)
        self.live += 1
        self.live_bytes += self._bytes[key]
        self.peak = max(self.peak, self.live)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def drop(self, key):
        self.live -= 1
        self.live_bytes -= self._bytes.pop(key)


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
    sends: list = field(default_factory=list)
    loss: float = 0.0


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
    ):
        """model: this rank's GPT (one chunk per virtual stage). group: the pipeline group (group rank =
        stage). neighbours: (previous, next) stage from the grid (a ring, for interleaving). act_shape:
        the [b, S_local, D] of an activation crossing stages. on_grads_final(module): called when a
        module's gradients are complete for the step (the last micro-batch's backward), so
        data-parallel buckets can start."""
        self.model, self.group = model, group
        self.pp, self.stage, self.v = pp, stage, virtual_stages
        self.prev, self.next = neighbours
        self.act_shape, self.act_dtype = tuple(act_shape), act_dtype
        self.on_grads_final = on_grads_final
        self.meter = CacheMeter()
        self._handlers = {
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
        return step.loss

    # ---- transfers -----------------------------------------------------------------------------
    def _vs(self, ins) -> int:
        return ins.chunk * self.pp + self.stage

    def _recv_forward(self, ins, step):
        buf = xp().empty(self.act_shape, dtype=self.act_dtype)
        tag = self.tag(ins.mb, self._vs(ins), False)
        step.inputs[ins.mb, ins.chunk] = self.group.recv(buf, self.prev, tag)

    def _send_forward(self, ins, step):
        tag = self.tag(ins.mb, self._vs(ins) + 1, False)
        step.sends.append(self.group.isend(step.outputs.pop((ins.mb, ins.chunk)), self.next, tag))

    def _recv_backward(self, ins, step):
        buf = xp().empty(self.act_shape, dtype=self.act_dtype)
        tag = self.tag(ins.mb, self._vs(ins), True)
        step.grads_in[ins.mb, ins.chunk] = self.group.recv(buf, self.next, tag)

    def _send_backward(self, ins, step):
        tag = self.tag(ins.mb, self._vs(ins) - 1, True)
        step.sends.append(self.group.isend(step.grads_out.pop((ins.mb, ins.chunk)), self.prev, tag))

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
        if dx is not None:
            step.grads_out[key] = xp().ascontiguousarray(dx)

    def _backward_weight(self, ins, step):
        key, chunk = (ins.mb, ins.chunk), self.model.chunks[ins.chunk]
        with ledger.get().span(f"W{ins.mb}.{ins.chunk}"):
            run_weight_grads(step.deferred.pop(key))
        self.meter.drop(key)
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
