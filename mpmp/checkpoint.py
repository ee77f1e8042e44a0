"""Checkpoints (sharded, any layout: docs/checkpoints.md) and the interchange format (one .npz: docs/interchange.md).

A checkpoint is a directory per step, written by every rank together:

    DIR/step_00000010/model_tp{t}_pp{p}.npz   this (tp, pp) position's parameters (dp and cp rank 0 write)
    DIR/step_00000010/optim_rank{r}.npz       AdamW state: each rank's ZeRO slices (replica 0 without ZeRO)
    DIR/step_00000010/manifest.json           layout, step, config, data position, file checksums
    DIR/latest                                 the name of the newest complete step directory

Files are written under a temporary name, fsynced and renamed; the step directory is assembled under
`.partial` and renamed after its manifest, so a crash mid-write leaves the previous checkpoint whole.
No pickle: every array file is loaded with allow_pickle=False.

`python -m mpmp.checkpoint export CKPT_DIR OUT.npz` assembles full tensors from any layout.
"""

import json
import math
import os
import re
import sys
import zlib
from dataclasses import dataclass

import numpy

from mpmp.cli import fail
from mpmp.comm.grid import coord_of, layout_ranks
from mpmp.config import LOW_PRECISION, ModelConfig, TrainConfig
from mpmp.errors import CheckpointError, DivergedError, MpmpError
from mpmp.model.gpt import param_infos, unit_params
from mpmp.nn.parallel import shard, unshard
from mpmp.optim.optimizer import STATE_KINDS

FORMAT, VERSION = "mpmp-checkpoint", 1
STEP_DIR = re.compile(r"step_(\d{8})")  # DIR/step_00000010: the checkpoint of step 10


@dataclass(frozen=True)
class TrainingState:
    """What a checkpoint saves, named (Megatron's save_checkpoint(iteration, model, optimizer, ...))."""

    step: int
    cfg: TrainConfig
    grid: object  # ProcessGrid or LocalGrid: this rank's coordinates and the world group
    model: object  # GPT: local_state() gives this rank's shards
    optimizer: object  # Optimizer: export_state() gives this rank's AdamW state
    flat_layout: list  # [(name, offset, shape)] of the flat buffers the optimizer state is laid out in
    split: list  # the pipeline partition: unit ranges per virtual stage
    data_order: str
    data_seed: int
    loss_scaler: dict


# ---------------------------------------------------------------------------------------------
# Files: atomic writes and checked reads
# ---------------------------------------------------------------------------------------------


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        # a full disk fails in write or fsync, whose OSError names no file: name the one we write
        raise OSError(exc.errno, exc.strerror or str(exc), exc.filename or path) from None
    _fsync_dir(os.path.dirname(path) or ".")


def atomic_save_npz(path: str, arrays: dict) -> int:
    """Write arrays as .npz atomically; returns the crc32 of the file's bytes."""
    import io

    buf = io.BytesIO()
    numpy.savez(buf, **arrays)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return zlib.crc32(data)


def load_npz(path: str, crc: int | None = None) -> dict:
    """Every array of an .npz as a dict; a missing, truncated or corrupt file raises CheckpointError."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            data = f.read()
        if crc is not None and zlib.crc32(data) != crc:
            raise CheckpointError(f"{path}: checksum mismatch (the file is corrupt or was changed)")
        import io

        with numpy.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except CheckpointError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, ValueError, EOFError, OSError ...
        raise CheckpointError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------------------------------------
# The interchange format
# ---------------------------------------------------------------------------------------------


def interchange_config(arrays: dict, heads: int, path: str = "interchange file") -> ModelConfig:
    """V, S, D, L from the shapes (H is a flag); CheckpointError naming any missing, extra or
    mis-shaped tensor."""
    for key in ("wte.weight", "wpe.weight"):
        if key not in arrays:
            raise CheckpointError(f"{path}: missing tensor {key}")
        if arrays[key].ndim != 2:
            raise CheckpointError(f"{path}: {key} must be 2-D, has shape {tuple(arrays[key].shape)}")
    v, s = arrays["wte.weight"].shape[0], arrays["wpe.weight"].shape[0]
    d = _width(arrays)
    layers = 0
    while any(k.startswith(f"h.{layers}.") for k in arrays):
        layers += 1
    cfg = ModelConfig(vocab=int(v), seq_len=int(s), d_model=int(d), layers=layers, heads=heads)
    expected = {p.name: p.shape for p in param_infos(cfg)}
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing:
        raise CheckpointError(
            f"{path}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if extra:
        raise CheckpointError(
            f"{path}: unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != tuple(shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(arrays[name].shape)}, expected {tuple(shape)}")
        if arrays[name].dtype.kind != "f":
            raise CheckpointError(f"{path}: {name} has dtype {arrays[name].dtype}, expected float32")
    check_finite(arrays, path)
    return cfg


def _width(arrays: dict) -> int:
    """D, as most of wte's columns, wpe's columns and ln_f's length say: one odd tensor (a narrowed
    wte) is then the one reported as mis-shaped, not the others."""
    votes = [arrays["wte.weight"].shape[1], arrays["wpe.weight"].shape[1]]
    if "ln_f.weight" in arrays and arrays["ln_f.weight"].ndim == 1:
        votes.append(arrays["ln_f.weight"].shape[0])
    return int(max(votes, key=votes.count))  # a tie: wte's


def parameters(step_dir: str, manifest: dict, optimizer: dict | None = None) -> dict:
    """A checkpoint's model parameters, full fp32 tensors: the master weights of a mixed-precision run
    (from `optimizer`, its optimizer_state when already read), else the weights. CheckpointError when
    any holds inf or NaN."""
    if optimizer is None and manifest["config"].get("dtype") in LOW_PRECISION:
        optimizer = optimizer_state(step_dir, manifest)
    params = (optimizer or {}).get("master") or full_tensors(step_dir, manifest)
    check_finite(params, step_dir)
    return params


def check_finite(arrays: dict, path: str):
    """Refuse weights holding inf or NaN, naming the first such tensor: training from them can only
    diverge."""
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not numpy.isfinite(a).all():
            count = int(a.size - numpy.count_nonzero(numpy.isfinite(a)))
            raise CheckpointError(f"{path}: {name} holds {count} non-finite value(s) (inf or NaN)")


def load_interchange(path: str, heads: int):
    """(ModelConfig, {name: float32 array}) from an interchange .npz."""
    arrays = load_npz(path)
    cfg = interchange_config(arrays, heads, path)
    return cfg, {k: numpy.ascontiguousarray(a, dtype=numpy.float32) for k, a in arrays.items()}


def save_interchange(path: str, arrays: dict):
    atomic_save_npz(path, {k: numpy.asarray(v, dtype=numpy.float32) for k, v in arrays.items()})


# ---------------------------------------------------------------------------------------------
# Checkpoint directories
# ---------------------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_dirs(root: str) -> list[tuple[int, str]]:
    """(step, name) of the step directories in a checkpoint root, oldest first."""
    found = [(STEP_DIR.fullmatch(d), d) for d in os.listdir(root)]
    return sorted((int(m.group(1)), d) for m, d in found if m)


def read_manifest(step_dir: str) -> dict:
    path = os.path.join(step_dir, "manifest.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{step_dir}: no manifest.json (not a complete checkpoint)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an mpmp checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: format version {manifest.get('version')}, this mpmp reads version {VERSION}")
    return manifest


def resolve(path: str) -> str:
    """A step directory from a checkpoint root (the one `latest` names, else its newest complete
    step) or a step directory."""
    step_dir, passed = choose(path)
    if step_dir is None:
        why = f" ({'; '.join(passed)})" if passed else ""
        raise CheckpointError(f"{path}: no complete checkpoint (no step_*/manifest.json){why}")
    return step_dir


def choose(path: str) -> tuple[str | None, list[str]]:
    """(the step directory to resume from, or None when a root holds no complete one; why each step
    directory newer than it was passed over). path: a step directory or a checkpoint root."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if _complete(path):
        return path, []
    dirs = step_dirs(path)
    complete = [d for _, d in dirs if _complete(os.path.join(path, d))]
    named = _latest(path)
    chosen = named if named in complete else (complete[-1] if complete else None)
    after = int(STEP_DIR.fullmatch(chosen).group(1)) if chosen else -1
    passed = [
        f"skipped {os.path.join(path, d)}: "
        + (
            "newer than the step `latest` names"
            if d in complete
            else "no manifest.json (an interrupted or damaged save)"
        )
        for s, d in dirs
        if s > after
    ]
    return (os.path.join(path, chosen) if chosen else None), passed


def _complete(step_dir: str) -> bool:
    return os.path.exists(os.path.join(step_dir, "manifest.json"))


def _latest(root: str) -> str | None:
    """The step directory name `latest` holds, if it holds one."""
    try:
        with open(os.path.join(root, "latest")) as f:
            name = f.read().strip()
    except OSError:
        return None
    return name if STEP_DIR.fullmatch(name) else None


def model_config_of(manifest) -> ModelConfig:
    return ModelConfig(**manifest["model"])


def full_tensors(step_dir: str, manifest=None, names=None) -> dict:
    """{name: full float32 tensor} assembled from the shards of any layout."""
    manifest = manifest or read_manifest(step_dir)
    cfg = model_config_of(manifest)
    lay = manifest["layout"]
    tp, pp = lay["tp"], lay["pp"]
    infos = {p.name: p for p in param_infos(cfg)}
    # The stage holding each tensor: the first virtual stage whose units use it (wte: the embedding's).
    owner = {}
    for vs, (a, b) in enumerate(lay["split"]):
        for unit in range(a, b):
            for name in unit_params(cfg, unit):
                owner.setdefault(name, vs % pp)
    files = manifest["files"]
    cache = {}

    def shard_file(t, p):
        key = f"model_tp{t}_pp{p}.npz"
        if key not in cache:
            if key not in files:
                raise CheckpointError(f"{step_dir}: manifest lists no {key}")
            cache[key] = load_npz(os.path.join(step_dir, key), files[key])
        return cache[key]

    def part(t, p, name):
        arrays = shard_file(t, p)
        if name not in arrays:
            raise CheckpointError(f"{step_dir}/model_tp{t}_pp{p}.npz: missing tensor {name}")
        return arrays[name]

    return {
        name: _assemble(step_dir, infos[name], [part(t, owner[name], name) for t in range(tp)])
        for name in names or infos
    }


def _assemble(step_dir, info, parts):
    """One full float32 tensor from its tp ranks' parts (in tp order), checked against its shape."""
    full = unshard(parts, info.split, info.shape)
    if tuple(full.shape) != tuple(info.shape):
        raise CheckpointError(f"{step_dir}: {info.name} assembles to {tuple(full.shape)}, expected {info.shape}")
    return full.astype(numpy.float32)


def save(root: str, state: TrainingState, keep_last: int = 0) -> str:
    """Every rank writes its shard of step state.step; rank 0 writes the manifest last, then removes
    checkpoints of later steps (left by a run this one resumed before) and, with keep_last = N > 0,
    all but the newest N. Collective. A file that cannot be written raises CheckpointError."""
    try:
        return _save(root, state, keep_last)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise CheckpointError(
            f"cannot write the checkpoint of step {state.step} in {root}: {exc.strerror or exc}{where}"
        ) from None


def _save(root, state, keep_last):
    grid = state.grid
    files = _files_to_write(state)
    _refuse_non_finite(state, files, root)  # collective: before anything is written or pruned
    final = os.path.join(root, step_dir_name(state.step))
    partial = final + ".partial"
    if grid.rank == 0:
        _fresh_dir(partial)
    grid.world.barrier()
    crcs = numpy.zeros(4, dtype=numpy.int64)  # [writes model file, its crc, writes optim file, its crc]
    for i, entry in enumerate(files):
        if entry is not None:
            crcs[2 * i : 2 * i + 2] = 1, atomic_save_npz(os.path.join(partial, entry[0]), entry[1])
    every = grid.world.all_gather(crcs.reshape(1, 4))
    if grid.rank == 0:
        manifest = _manifest(state, _file_checksums(every.tolist(), grid.tp, grid.dp, grid.cp))
        atomic_write_bytes(os.path.join(partial, "manifest.json"), json.dumps(manifest, indent=1).encode())
        if os.path.exists(final):
            import shutil

            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(root)
        atomic_write_bytes(os.path.join(root, "latest"), (step_dir_name(state.step) + "\n").encode())
        _prune(root, state.step, keep_last)  # only after a complete, finite checkpoint
    grid.world.barrier()
    return final


def _files_to_write(state: TrainingState) -> list:
    """[model file, optimizer file] this rank writes, each (name, {key: array}) or None: its (tp, pp)
    position's parameters (data-parallel and context-parallel rank 0: cp ranks hold the same weights
    and state, as dp replicas do), its optimizer state (every rank under ZeRO; without ZeRO every
    replica holds the same state and replica 0 writes it)."""
    grid, c = state.grid, state.grid.coord
    first = c.dp == 0 and c.cp == 0
    model = (f"model_tp{c.tp}_pp{c.pp}.npz", state.model.local_state()) if first else None
    optim = None
    if state.optimizer.zero or first:
        optim = (f"optim_rank{grid.rank}.npz", _optimizer_arrays(state.optimizer.export_state(), state.flat_layout))
    return [model, optim]


def _refuse_non_finite(state: TrainingState, files: list, root: str):
    """DivergedError on every rank when any rank's files would hold inf or NaN: one all-gather of each
    rank's first offending tensor, so that every rank decides alike and nothing is written or pruned
    (--keep-last never removes the newest finite checkpoint for a broken one)."""
    mine = next((bad for bad in (_first_non_finite(e, state.flat_layout) for e in files if e) if bad), None)
    found = [(r, bad) for r, bad in enumerate(state.grid.world.all_gather_json(mine)) if bad]
    if found:
        rank, bad = found[0]
        where = f" on rank {rank}" if state.grid.world_size > 1 else ""
        raise DivergedError(
            f"refusing to save the checkpoint of step {state.step}: {bad} holds non-finite values{where}; "
            f"{root} keeps its earlier checkpoints"
        )


def _first_non_finite(entry, flat_layout) -> str | None:
    """ "FILE: tensor" for the first array of a file entry holding inf or NaN; optimizer arrays are
    named by the parameter their first bad value belongs to."""
    file, arrays = entry
    for key, a in arrays.items():
        if a.dtype.kind == "f" and not numpy.isfinite(a).all():
            kind = re.fullmatch(r"(m|v|master)(\d+)", key)
            if kind is None or "ranges" not in arrays:
                return f"{file}: {key}"
            offset = int(arrays["ranges"][int(kind.group(2))][0]) + int(numpy.argmin(numpy.isfinite(a)))
            owner = next((n for n, off, shape in flat_layout if off <= offset < off + math.prod(shape)), key)
            what = {"m": "AdamW's m", "v": "AdamW's v", "master": "fp32 master"}[kind.group(1)]
            return f"{file}: {what} of {owner}"
    return None


def _fresh_dir(path: str):
    """An empty folder at path: a save killed mid-write leaves its .partial folder with temporary
    (*.tmp-PID) and finished files, which must not end up in this checkpoint."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)


def _file_checksums(rows, tp: int, dp: int, cp: int = 1) -> dict:
    """{file name: crc32} from every rank's [writes model, crc, writes optim, crc] row."""
    files = {}
    for r, (has_model, crc_model, has_opt, crc_opt) in enumerate(rows):
        rc = coord_of(r, tp, dp, cp)
        if has_model:
            files[f"model_tp{rc.tp}_pp{rc.pp}.npz"] = crc_model
        if has_opt:
            files[f"optim_rank{r}.npz"] = crc_opt
    return files


def _manifest(state: TrainingState, files: dict) -> dict:
    cfg, par = state.cfg, state.cfg.parallel
    layout = {
        "tp": par.tp,
        "pp": par.pp,
        "dp": par.dp,
        "cp": par.cp,
        "zero": par.zero,
        "virtual_stages": par.virtual_stages,
        "split": [list(r) for r in state.split],
        "sequence_parallel": par.sequence_parallel,
    }
    return {
        "format": FORMAT,
        "version": VERSION,
        "step": state.step,
        "model": cfg.model.__dict__,
        "layout": layout,
        "config": cfg.to_dict(),
        "data": {
            "order": state.data_order,
            "seed": state.data_seed,
            "sequences_consumed": state.step * cfg.global_batch,
        },
        "files": files,
        "loss_scaler": state.loss_scaler,
    }


def _optimizer_arrays(exported: dict, flat_layout) -> dict:
    """An optimizer's export_state() as .npz arrays: its ranges of the flat buffer, the state of each
    range (m0, v0[, master0], m1, ...), the AdamW step and the buffer's layout."""
    arrays = {"ranges": numpy.asarray(exported["ranges"], dtype=numpy.int64).reshape(-1, 2)}
    for kind in STATE_KINDS:
        for i, a in enumerate(exported.get(kind, ())):
            arrays[f"{kind}{i}"] = a
    arrays["adam_step"] = numpy.int64(exported["step"])
    arrays["layout"] = numpy.frombuffer(json.dumps(flat_layout).encode(), dtype=numpy.uint8)
    return arrays


def _prune(root: str, step: int, keep: int):
    """After writing `step`: remove step directories after it (an abandoned future: this run resumed
    from an earlier checkpoint) and, with keep > 0, all but the newest `keep` up to it."""
    import shutil

    steps = step_dirs(root)
    stale = [d for s, d in steps if s > step]
    kept = [d for s, d in steps if s <= step]
    stale += kept[:-keep] if keep > 0 else []
    for d in stale:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def optimizer_state(step_dir: str, manifest=None) -> dict:
    """{"m": {name: full}, "v": {name: full}, "master": {name: full} (mixed precision only), "step": n}
    assembled from every rank's optimizer file, whatever the layout and ZeRO sharding was."""
    manifest = manifest or read_manifest(step_dir)
    cfg = model_config_of(manifest)
    lay = manifest["layout"]
    # One flat vector per (tp, pp) position, filled from its dp x cp ranks' slices; without ZeRO replica
    # 0 (cp rank 0) holds every replica's (identical) state. Checkpoints before cp have no "cp": 1.
    flat, layouts, step = {}, {}, 0
    for r, c in layout_ranks(lay["tp"], lay["pp"], lay["dp"], lay.get("cp", 1)):
        if lay.get("zero") or (c.dp == 0 and c.cp == 0):
            layouts[c.tp, c.pp], step = _read_optimizer_file(step_dir, manifest, r, flat.setdefault((c.tp, c.pp), {}))
    infos = {p.name: p for p in param_infos(cfg)}
    kinds = [k for k in STATE_KINDS if k in flat[0, 0]]
    out = {k: {} for k in kinds}
    where = {key: {nm: (off, shape) for nm, off, shape in layout} for key, layout in layouts.items()}

    def part(t, p, k, name):
        off, shape = where[t, p][name]
        return flat[t, p][k][off : off + int(numpy.prod(shape))].reshape(shape)

    for p in range(lay["pp"]):
        for name in where[0, p]:
            if name in out["m"]:
                continue  # the tied wte: the first stage's copy wins
            for k in kinds:
                out[k][name] = _assemble(step_dir, infos[name], [part(t, p, k, name) for t in range(lay["tp"])])
    out["step"] = step
    return out


def _read_optimizer_file(step_dir, manifest, rank: int, vectors: dict):
    """Read optim_rank{rank}.npz into the whole-buffer vectors of its (tp, pp) position (created on
    first use); returns (the flat layout, the AdamW step)."""
    key = f"optim_rank{rank}.npz"
    if key not in manifest["files"]:
        raise CheckpointError(f"{step_dir}: manifest lists no {key}")
    z = load_npz(os.path.join(step_dir, key), manifest["files"][key])
    try:
        layout = json.loads(bytes(z["layout"]).decode())
        ranges = z["ranges"].reshape(-1, 2)
        n = max(max(off + int(numpy.prod(shape)) for _, off, shape in layout), int(ranges[:, 1].max()))
        for k in (k for k in STATE_KINDS if f"{k}0" in z):
            vec = vectors.setdefault(k, numpy.zeros(n, numpy.float32))
            for i, (lo, hi) in enumerate(ranges.tolist()):
                vec[lo:hi] = z[f"{k}{i}"]
        return layout, int(z["adam_step"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{step_dir}/{key}: malformed optimizer file ({exc})") from None


def optimizer_vectors(state: dict, flat, tp_rank: int, tp: int, mixed: bool) -> dict:
    """Full optimizer tensors (optimizer_state, any old layout) as whole-buffer vectors in this rank's
    flat layout, ready for Optimizer.import_state: each tensor sharded for this tp rank."""
    kinds = [k for k in STATE_KINDS if k in state and (k != "master" or mixed)]
    vecs = {k: numpy.zeros(len(flat), numpy.float32) for k in kinds}
    for p in flat.params:
        off, size = flat.span(p)
        for k in kinds:
            if p.name not in state[k]:
                raise CheckpointError(f"checkpoint has no optimizer state for {p.name}")
            vecs[k][off : off + size] = shard(state[k][p.name], p.split, tp_rank, tp).reshape(-1)
    return vecs


def export(ckpt: str, out_path: str) -> str:
    """The checkpoint's weights as an interchange file: the fp32 master weights when the run was in
    mixed precision (the same numbers --resume continues from), else the parameters."""
    step_dir = resolve(ckpt)
    manifest = read_manifest(step_dir)
    masters = optimizer_state(step_dir, manifest).get("master")
    save_interchange(out_path, masters or full_tensors(step_dir, manifest))
    return step_dir


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mpmp.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a checkpoint (any layout) as one interchange .npz")
    ex.add_argument("checkpoint", help="a checkpoint directory (--save DIR) or one of its step_* directories")
    ex.add_argument("out", help="the .npz to write")
    args = parser.parse_args(argv)
    try:
        step_dir = export(args.checkpoint, args.out)
    except MpmpError as exc:
        return fail(exc)
    except OSError as exc:
        sys.stderr.write(f"error: cannot write {args.out}: {exc.strerror or exc}\n")
        return 2
    print(f"exported {step_dir} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
