"""Where a model's weights come from: an interchange .npz, an mpmp checkpoint, or Hugging Face GPT-2.

`load(path, heads)` returns (ModelConfig, {interchange name: float32 array}) for `--init-from` of both
`python -m mpmp.train` and `python -m mpmp.generate`:

- `*.safetensors`: a Hugging Face GPT-2 `model.safetensors`, read with the safetensors library's
  NumPy API. Its names are the interchange names with or without the `transformer.` prefix, and its
  Conv1D weights are already [in, out]. `lm_head.weight` is accepted when it equals `wte.weight` (the
  tied head), refused otherwise; the causal-mask buffers `h.{i}.attn.bias` / `attn.masked_bias` are
  ignored. The heads come from `config.json` beside the file (`n_head`) when there is one.
- a directory: an mpmp checkpoint (a `--save` folder or one of its step directories): the fp32 master
  weights of a mixed-precision run, else the parameters; the heads come from its manifest.
- anything else: an interchange `.npz` (docs/interchange.md); the heads are `--heads` (default 4).
"""

import json
import os
import re

import numpy

from mpmp.config import ModelConfig
from mpmp.errors import CheckpointError, ConfigError

DEFAULT_HEADS = ModelConfig().heads
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # GPT-2's causal mask, not a weight


def load(path: str, heads: int | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, full float32 tensors) from any supported source. heads: --heads when the user
    gave it (it must then agree with what the source says), else None."""
    from mpmp import checkpoint

    if os.path.isdir(path):
        return _load_checkpoint(path, heads)
    if path.endswith(".safetensors"):
        arrays = read_safetensors(path)
        heads = _agree(heads, config_heads(path), os.path.join(os.path.dirname(path) or ".", "config.json"))
        cfg = checkpoint.interchange_config(arrays, heads, path)
        return cfg, {k: numpy.ascontiguousarray(a, dtype=numpy.float32) for k, a in arrays.items()}
    return checkpoint.load_interchange(path, DEFAULT_HEADS if heads is None else heads)


def _agree(given: int | None, found: int | None, where: str) -> int:
    """The number of heads: the file's, which a given --heads must equal; else --heads or the default."""
    if found is not None and given is not None and given != found:
        raise ConfigError(f"--heads {given} disagrees with {where} ({found} heads); leave it out")
    return found if found is not None else DEFAULT_HEADS if given is None else given


def read_safetensors(path: str) -> dict:
    """A Hugging Face GPT-2 state dict as interchange-named arrays (see the module's docstring)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise ConfigError(
            f"{path}: reading .safetensors needs the safetensors package (pip install 'mpmp[hf]')"
        ) from None
    try:
        raw = load_file(path)
    except Exception as exc:  # SafetensorError, a dtype NumPy lacks (bfloat16), OSError ...
        raise CheckpointError(f"{path}: not a readable float safetensors file ({type(exc).__name__}: {exc})") from None
    return hf_to_interchange(raw, path)


def hf_to_interchange(raw: dict, path: str = "safetensors file") -> dict:
    """Strip `transformer.`, drop the mask buffers, check that lm_head is the tied wte and drop it."""
    arrays = {}
    for name, a in raw.items():
        short = name.removeprefix("transformer.")
        if not _MASK_BUFFER.fullmatch(short):
            arrays[short] = a
    head = arrays.pop("lm_head.weight", None)
    wte = arrays.get("wte.weight")
    if head is not None and wte is not None and not (head.shape == wte.shape and numpy.array_equal(head, wte)):
        raise CheckpointError(
            f"{path}: lm_head.weight {tuple(head.shape)} differs from wte.weight {tuple(wte.shape)}; mpmp's GPT-2 "
            "ties the output head to the token embedding and cannot load an untied one"
        )
    return arrays


def config_heads(path: str) -> int | None:
    """n_head of the config.json beside a model file, None when there is no such file."""
    config = os.path.join(os.path.dirname(path) or ".", "config.json")
    if not os.path.isfile(config):
        return None
    try:
        with open(config) as f:
            n = json.load(f).get("n_head")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{config}: unreadable ({exc})") from None
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"{config}: no positive integer n_head (found {n!r}); give --heads or remove the file")
    return n


def _load_checkpoint(path: str, heads: int | None):
    from mpmp import checkpoint

    step_dir = checkpoint.resolve(path)
    manifest = checkpoint.read_manifest(step_dir)
    cfg = checkpoint.model_config_of(manifest)
    _agree(heads, cfg.heads, f"the checkpoint {step_dir}")
    return cfg, checkpoint.parameters(step_dir, manifest)
