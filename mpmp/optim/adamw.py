"""AdamW exactly as torch.optim.AdamW (decoupled weight decay, bias correction), on flat buffers.

Parameters live in one contiguous buffer per rank (optim.buffer.FlatParams), so an update is a few
vectorised passes instead of a Python loop over tensors. Weight decay applies where decay_mask is 1
(matrices and embeddings), never to biases or LayerNorm parameters.
"""

import math

from mpmp.backend import array_module


def adamw_update(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, decay_mask):
    """One AdamW step in place on flat arrays (step counts from 1), in torch's order of operations."""
    xp = array_module(param)
    if weight_decay:
        # param *= 1 - lr * wd, only where decay applies
        param *= 1 - (lr * weight_decay) * decay_mask
    m += (1 - beta1) * (grad - m)  # torch: exp_avg.lerp_(grad, 1 - beta1)
    v *= beta2
    v += (1 - beta2) * grad * grad
    bias1 = 1 - beta1**step
    bias2_sqrt = math.sqrt(1 - beta2**step)
    denom = xp.sqrt(v)
    denom /= bias2_sqrt
    denom += eps
    update = m / denom
    update *= lr / bias1
    param -= update


class AdamW:
    """State (m, v) for one flat parameter buffer or shard of it."""

    def __init__(self, param, decay_mask, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        xp = array_module(param)
        self.param = param
        self.decay_mask = decay_mask.astype(param.dtype)
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.m = xp.zeros_like(param)
        self.v = xp.zeros_like(param)
        self.step_count = 0

    def step(self, grad, lr):
        self.step_count += 1
        adamw_update(
            self.param, grad, self.m, self.v, self.step_count, lr,
            self.beta1, self.beta2, self.eps, self.weight_decay, self.decay_mask,
        )  # fmt: skip

    def state_bytes(self) -> int:
        return self.m.nbytes + self.v.nbytes
