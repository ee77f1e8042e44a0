"""Dynamic loss scaling for fp16 (Micikevicius et al., arXiv 1710.03740 §3.2; Megatron's and
torch.cuda.amp.GradScaler's rule).

The loss is multiplied by a scale S before backward so that small gradients survive fp16's narrow
range; gradients are divided by S before the update. A step whose gradients overflowed (inf or NaN
anywhere, seen as a non-finite global norm) is skipped and S is halved; after `interval` good steps
in a row S is doubled. A run whose steps keep overflowing with S at its floor is not recovering: after
`patience` such steps in a row the scaler gives up, and the trainer stops the run as diverged.
"""

import math


class DynamicLossScaler:
    def __init__(self, initial=2.0**16, growth=2.0, backoff=0.5, interval=200, minimum=1.0, patience=20):
        self.scale, self.growth, self.backoff = initial, growth, backoff
        self.interval, self.minimum, self.patience = interval, minimum, patience
        self.good_steps = 0
        self.skipped = 0
        self.floor_overflows = 0  # overflowed steps in a row whose scale was already the minimum

    @staticmethod
    def overflowed(grad_norm: float) -> bool:
        return not math.isfinite(grad_norm)

    @property
    def gave_up(self) -> bool:
        return self.floor_overflows >= self.patience

    def update(self, overflow: bool):
        """After a step that used self.scale: back off on overflow, grow after `interval` good steps."""
        at_floor = self.scale <= self.minimum
        self.floor_overflows = self.floor_overflows + 1 if overflow and at_floor else 0
        if overflow:
            self.scale = max(self.minimum, self.scale * self.backoff)
            self.good_steps = 0
            self.skipped += 1
        else:
            self.good_steps += 1
            if self.good_steps % self.interval == 0:
                self.scale *= self.growth

    def state(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load(self, state: dict):
        self.scale, self.good_steps, self.skipped = state["scale"], state["good_steps"], state["skipped"]


class NoLossScaling:
    """fp32 and bf16: the identity."""

    scale = 1.0
    skipped = 0
    gave_up = False

    @staticmethod
    def overflowed(grad_norm: float) -> bool:
        return False

    def update(self, overflow: bool):
        pass

    def state(self) -> dict:
        return {}

    def load(self, state: dict):
        pass
