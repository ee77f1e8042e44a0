"""Executes one rank's instruction list (see schedules.py) for one training step.

Sends are non-blocking (their buffers stay alive until the step ends); receives are posted where the
instruction stands and waited on at once. That is exactly the model the schedule checker simulates, so
a checked schedule cannot deadlock here. Every micro-batch in flight keeps its own cache; the engine
counts them (peak_caches) and their bytes (peak_bytes) so tests can assert the memory behaviour of each
schedule and the trainer can report activation memory.
"""

from mpmp.backend import xp
from mpmp.comm import ledger
from mpmp.nn.layers import run_weight_grads
from mpmp.pipeline import schedules as S

MAX_TAGS = 32768  # the tag range every MPI library offers (MPI_TAG_UB >= 32767)


class PipelineEngine:
    def __init__(self, model, pp_group, pp: int, stage: int, neighbours, virtual_stages: int, act_shape, act_dtype,
                 grads_final=None):  # fmt: skip
        """model: this rank's GPT (one chunk per virtual stage). neighbours: (previous, next) stage from
        the grid, as pp-group ranks (a ring, for interleaving). act_shape: the [b, S_local, D] of an
        activation crossing stages. grads_final(chunk, module): called when a module's gradients are
        complete for the step (the last micro-batch's backward), so data-parallel buckets can start."""
        self.model, self.group = model, pp_group
        self.pp, self.stage, self.v = pp, stage, virtual_stages
        self.prev, self.next = neighbours
        self.act_shape, self.act_dtype = tuple(act_shape), act_dtype
        self.grads_final = grads_final
        self.n_vs = pp * virtual_stages

    def _tag(self, mb, receiver_vs, backward):
        """A tag unique to each message of a step (MPI guarantees tags up to 32767: see MAX_TAGS)."""
        return (mb * self.n_vs + receiver_vs) * 2 + int(backward)

    def run(self, program, microbatches, reduce_grads=None, optimizer_step=None):
        """Execute; returns the sum of this rank's micro-batch losses (non-zero on the last stage)."""
        led = ledger.get()
        m = len(microbatches)
        chunks = self.model.chunks
        inputs, outputs, grads_in, grads_out = {}, {}, {}, {}
        caches, deferred = {}, {}
        backward_count = [0] * len(chunks)
        sends = []
        loss = 0.0
        self.live = self.peak_caches = 0
        self.live_bytes = self.peak_bytes = 0
        cache_bytes = {}

        for ins in program:
            key = (ins.mb, ins.chunk)
            vs = ins.chunk * self.pp + self.stage
            if isinstance(ins, S.RecvForward):
                buf = xp().empty(self.act_shape, dtype=self.act_dtype)
                inputs[key] = self.group.recv(buf, self.prev, self._tag(ins.mb, vs, False))
            elif isinstance(ins, S.SendForward):
                sends.append(self.group.isend(outputs.pop(key), self.next, self._tag(ins.mb, vs + 1, False)))
            elif isinstance(ins, S.RecvBackward):
                buf = xp().empty(self.act_shape, dtype=self.act_dtype)
                grads_in[key] = self.group.recv(buf, self.next, self._tag(ins.mb, vs, True))
            elif isinstance(ins, S.SendBackward):
                sends.append(self.group.isend(grads_out.pop(key), self.prev, self._tag(ins.mb, vs - 1, True)))
            elif isinstance(ins, S.Forward):
                with led.span(f"F{ins.mb}.{ins.chunk}"):
                    y, caches[key] = chunks[ins.chunk].forward(inputs.pop(key, None), microbatches[ins.mb])
                self.live += 1
                self.peak_caches = max(self.peak_caches, self.live)
                cache_bytes[key] = nbytes(caches[key])
                self.live_bytes += cache_bytes[key]
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                if chunks[ins.chunk].is_last:
                    loss += y
                else:
                    outputs[key] = xp().ascontiguousarray(y)
            elif isinstance(ins, (S.Backward, S.BackwardInput)):
                split = isinstance(ins, S.BackwardInput)
                backward_count[ins.chunk] += 1
                final = not split and backward_count[ins.chunk] == m and self.grads_final is not None
                wgrad = [] if split else None
                with led.span(f"{'B' if split else 'BW'}{ins.mb}.{ins.chunk}"):
                    dx = chunks[ins.chunk].backward(
                        grads_in.pop(key, None), caches.pop(key), wgrad,
                        on_module_done=(lambda mod, c=ins.chunk: self.grads_final(c, mod)) if final else None,
                    )  # fmt: skip
                if split:
                    deferred[key] = wgrad
                else:
                    self.live -= 1
                    self.live_bytes -= cache_bytes.pop(key)
                if dx is not None:
                    grads_out[key] = xp().ascontiguousarray(dx)
            elif isinstance(ins, S.BackwardWeight):
                with led.span(f"W{ins.mb}.{ins.chunk}"):
                    run_weight_grads(deferred.pop(key))
                self.live -= 1
                self.live_bytes -= cache_bytes.pop(key)
                if backward_count[ins.chunk] == m and not any(k[1] == ins.chunk for k in deferred):
                    if self.grads_final is not None:
                        for mod in reversed(chunks[ins.chunk].modules):
                            self.grads_final(ins.chunk, mod)
            elif isinstance(ins, S.ReduceGrads):
                for h in sends:
                    h.wait()
                sends.clear()
                if reduce_grads is not None:
                    reduce_grads()
            elif isinstance(ins, S.OptimizerStep):
                if optimizer_step is not None:
                    optimizer_step()
        for h in sends:
            h.wait()
        return loss


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
