"""Checkpoints and the interchange format (docs/interchange.md, a contract).

One process, no MPI: a Trainer on a LocalGrid, saved with checkpoint.save, exported with
`python -m mpmp.checkpoint export` and read back with load_interchange.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from helpers import gpt2_reference_loss

from mpmp import checkpoint
from mpmp.comm.grid import LocalGrid
from mpmp.config import ModelConfig, ParallelConfig, TrainConfig
from mpmp.data import TokenData, builtin_corpus
from mpmp.errors import CheckpointError
from mpmp.model.gpt import GPT, random_source
from mpmp.runtime import Trainer

ROOT = Path(__file__).resolve().parent.parent
V, S, D, L, H = 256, 16, 32, 2, 2
MODEL = ModelConfig(vocab=V, seq_len=S, d_model=D, layers=L, heads=H)


def make_trainer(source=None, seed=0):
    cfg = TrainConfig(model=MODEL, parallel=ParallelConfig(), global_batch=4, seq_len=S, steps=2, seed=seed)
    data = TokenData(builtin_corpus(), S, V)
    return Trainer(cfg, LocalGrid(), data, source or random_source(MODEL, seed))


def expected_shapes(v, s, d, layers):
    """docs/interchange.md's table, written out."""
    shapes = {"wte.weight": (v, d), "wpe.weight": (s, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(layers):
        shapes.update(
            {
                f"h.{i}.ln_1.weight": (d,),
                f"h.{i}.ln_1.bias": (d,),
                f"h.{i}.attn.c_attn.weight": (d, 3 * d),
                f"h.{i}.attn.c_attn.bias": (3 * d,),
                f"h.{i}.attn.c_proj.weight": (d, d),
                f"h.{i}.attn.c_proj.bias": (d,),
                f"h.{i}.ln_2.weight": (d,),
                f"h.{i}.ln_2.bias": (d,),
                f"h.{i}.mlp.c_fc.weight": (d, 4 * d),
                f"h.{i}.mlp.c_fc.bias": (4 * d,),
                f"h.{i}.mlp.c_proj.weight": (4 * d, d),
                f"h.{i}.mlp.c_proj.bias": (d,),
            }
        )
    return shapes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained two steps, its checkpoint, and that checkpoint exported by main()."""
    root = tmp_path_factory.mktemp("ckpt")
    trainer = make_trainer()
    for _ in range(2):
        metrics = trainer.train_step()
    assert numpy.isfinite(metrics["loss"])
    step_dir = checkpoint.save(str(root / "run"), trainer.state())
    out = str(root / "model.npz")
    assert checkpoint.main(["export", str(root / "run"), out]) == 0
    return trainer, str(root / "run"), step_dir, out


def assert_bit_equal(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name in want:
        a, b = numpy.asarray(got[name]), numpy.asarray(want[name])
        assert a.dtype == numpy.float32, name
        assert a.shape == b.shape, name
        assert numpy.array_equal(a.view(numpy.uint32), b.astype(numpy.float32).view(numpy.uint32)), name


def write_npz(path, arrays):
    numpy.savez(path, **arrays)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


def test_save_writes_a_step_directory_with_manifest(trained):
    trainer, run_dir, step_dir, _ = trained
    assert os.path.basename(step_dir) == "step_00000002"
    manifest = checkpoint.read_manifest(step_dir)
    assert manifest["step"] == 2
    assert manifest["model"] == {"vocab": V, "seq_len": S, "d_model": D, "layers": L, "heads": H}
    assert Path(run_dir, "latest").read_text().strip() == "step_00000002"
    assert checkpoint.resolve(run_dir) == step_dir


def test_export_then_import_is_bit_exact(trained):
    trainer, _, _, out = trained
    cfg, arrays = checkpoint.load_interchange(out, heads=H)
    assert cfg == MODEL
    assert_bit_equal(arrays, trainer.model.local_state())


def test_export_holds_the_trained_not_the_initial_weights(trained):
    trainer, _, _, out = trained
    _, arrays = checkpoint.load_interchange(out, heads=H)
    init = random_source(MODEL, 0)
    assert not numpy.array_equal(arrays["h.0.attn.c_attn.weight"], init("h.0.attn.c_attn.weight"))


def test_interchange_names_and_shapes_follow_the_design_table(trained):
    _, _, _, out = trained
    with numpy.load(out, allow_pickle=False) as z:
        shapes = {k: z[k].shape for k in z.files}
        dtypes = {z[k].dtype for k in z.files}
    assert shapes == expected_shapes(V, S, D, L)
    assert dtypes == {numpy.dtype(numpy.float32)}


def test_export_via_the_command_line_matches_the_model(trained, tmp_path):
    trainer, run_dir, step_dir, _ = trained
    out = tmp_path / "cli.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "mpmp.checkpoint", "export", step_dir, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    _, arrays = checkpoint.load_interchange(str(out), heads=H)
    assert_bit_equal(arrays, trainer.model.local_state())


def test_imported_model_exports_the_same_tensors(trained, tmp_path):
    # interchange -> model -> checkpoint -> interchange changes no bit.
    _, _, _, out = trained
    _, arrays = checkpoint.load_interchange(out, heads=H)
    again = make_trainer(source=arrays.__getitem__)
    assert_bit_equal(again.model.local_state(), arrays)
    checkpoint.save(str(tmp_path / "again"), again.state())
    out2 = str(tmp_path / "again.npz")
    assert checkpoint.main(["export", str(tmp_path / "again"), out2]) == 0
    _, arrays2 = checkpoint.load_interchange(out2, heads=H)
    assert_bit_equal(arrays2, arrays)


def test_export_preserves_every_bit_of_unusual_floats(tmp_path):
    # Negative zero, subnormals, the largest float32 and arbitrary bit patterns survive the trip.
    special = numpy.array([-0.0, 1e-45, -1e-40, 3.4028235e38, -1.1754944e-38, 1.0, 0.1], dtype=numpy.float32)
    base = random_source(MODEL, 3)

    def source(name):
        a = base(name).copy()
        flat = a.reshape(-1)
        flat[: special.size] = special[: flat.size]
        return a

    trainer = make_trainer(source=source)
    checkpoint.save(str(tmp_path / "ck"), trainer.state())
    out = str(tmp_path / "special.npz")
    checkpoint.export(str(tmp_path / "ck"), out)
    _, arrays = checkpoint.load_interchange(out, heads=H)
    assert_bit_equal(arrays, trainer.model.local_state())
    assert numpy.signbit(arrays["wte.weight"].reshape(-1)[0])


def test_save_interchange_then_load_round_trips(tmp_path):
    source = random_source(MODEL, 9)
    arrays = {name: source(name) for name in expected_shapes(V, S, D, L)}
    path = str(tmp_path / "x.npz")
    checkpoint.save_interchange(path, arrays)
    cfg, back = checkpoint.load_interchange(path, heads=H)
    assert cfg == MODEL
    assert_bit_equal(back, arrays)


def test_heads_come_from_the_caller_and_the_rest_from_the_shapes(trained):
    _, _, _, out = trained
    cfg, _ = checkpoint.load_interchange(out, heads=4)
    assert (cfg.vocab, cfg.seq_len, cfg.d_model, cfg.layers, cfg.heads) == (V, S, D, L, 4)


# ---------------------------------------------------------------------------------------------
# Refusals: CheckpointError naming the tensor or the file
# ---------------------------------------------------------------------------------------------


def good_arrays():
    source = random_source(MODEL, 1)
    return {name: source(name) for name in expected_shapes(V, S, D, L)}


@pytest.mark.parametrize("name", ["h.1.mlp.c_fc.bias", "ln_f.weight", "h.0.attn.c_proj.weight", "wpe.weight"])
def test_missing_tensor_is_refused_by_name(tmp_path, name):
    arrays = good_arrays()
    del arrays[name]
    path = write_npz(tmp_path / "missing.npz", arrays)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_interchange(path, heads=H)
    assert name in str(err.value)
    assert path in str(err.value)


@pytest.mark.parametrize("name", ["lm_head.weight", "h.0.attn.bias", "transformer.wte.weight"])
def test_extra_tensor_is_refused_by_name(tmp_path, name):
    arrays = good_arrays()
    arrays[name] = numpy.zeros((3,), numpy.float32)
    path = write_npz(tmp_path / "extra.npz", arrays)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_interchange(path, heads=H)
    assert name in str(err.value)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("h.0.attn.c_attn.weight", (3 * D, D)),  # [out, in]: PyTorch Linear's layout, not Conv1D's
        ("h.1.mlp.c_proj.weight", (D, 4 * D)),
        ("h.0.ln_2.bias", (D + 1,)),
        ("ln_f.weight", (1, D)),
    ],
)
def test_wrong_shape_is_refused_by_name(tmp_path, name, shape):
    arrays = good_arrays()
    arrays[name] = numpy.zeros(shape, numpy.float32)
    path = write_npz(tmp_path / "shape.npz", arrays)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_interchange(path, heads=H)
    assert name in str(err.value)


def test_truncated_npz_is_refused_naming_the_file(trained, tmp_path):
    _, _, _, out = trained
    data = Path(out).read_bytes()
    path = tmp_path / "truncated.npz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_interchange(str(path), heads=H)
    assert str(path) in str(err.value)


def test_corrupt_npz_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(numpy.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_interchange(str(path), heads=H)
    assert str(path) in str(err.value)


def test_pickled_object_array_is_refused(tmp_path):
    arrays = good_arrays()
    arrays["wte.weight"] = numpy.array([object()] * 4, dtype=object)
    path = tmp_path / "pickled.npz"
    numpy.savez(path, **arrays)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_interchange(str(path), heads=H)
    assert str(path) in str(err.value)


def test_missing_interchange_file_is_refused_naming_it(tmp_path):
    path = str(tmp_path / "absent.npz")
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_interchange(path, heads=H)
    assert path in str(err.value)


def test_changed_shard_fails_its_checksum(tmp_path):
    trainer = make_trainer()
    step_dir = checkpoint.save(str(tmp_path / "ck"), trainer.state())
    shard = Path(step_dir, "model_tp0_pp0.npz")
    arrays = dict(numpy.load(shard, allow_pickle=False))
    arrays["ln_f.bias"] = arrays["ln_f.bias"] + 1
    numpy.savez(shard, **arrays)
    with pytest.raises(CheckpointError) as err:
        checkpoint.export(str(tmp_path / "ck"), str(tmp_path / "out.npz"))
    assert "model_tp0_pp0.npz" in str(err.value)


def test_export_of_a_missing_checkpoint_exits_2_with_one_line(tmp_path, capsys):
    rc = checkpoint.main(["export", str(tmp_path / "nothing"), str(tmp_path / "out.npz")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(tmp_path / "nothing") in err[0]
    assert not (tmp_path / "out.npz").exists()


def test_no_source_file_loads_with_allow_pickle_true():
    # `grep -rn "allow_pickle=True" mpmp/` finds nothing (also with spaces around the "=").
    hits = []
    for path in sorted((ROOT / "mpmp").rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
            if b"allow_pickle=True" in line.replace(b" ", b""):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip().decode(errors='replace')}")
    assert not hits, "\n".join(hits)


def test_gpt_local_state_names_are_the_interchange_names():
    model = GPT(MODEL, random_source(MODEL, 0))
    state = model.local_state()
    assert {k: v.shape for k, v in state.items()} == expected_shapes(V, S, D, L)


def test_export_into_a_missing_folder_exits_2_with_one_line(trained, tmp_path):
    _, run_dir, _, _ = trained
    out = str(tmp_path / "no-such-folder" / "out.npz")
    proc = subprocess.run(
        [sys.executable, "-m", "mpmp.checkpoint", "export", run_dir, out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "no-such-folder") in lines[0], proc.stderr


def test_interchange_tensors_are_read_as_gpt2(tmp_path):
    # Every tensor random (biases and LayerNorms too), so q/k/v order, head columns, the [in, out]
    # layout and the tied head all change the loss if the model read them otherwise.
    # Large c_attn weights make attention peaked, so that a different head split shows in the loss.
    rng = numpy.random.default_rng(4)
    std = {1: 0.3, 2: 0.1}
    arrays = {
        name: (rng.standard_normal(shape) * (0.5 if "c_attn" in name else std[len(shape)])).astype(numpy.float32)
        for name, shape in expected_shapes(V, S, D, L).items()
    }
    for name in arrays:
        if ".ln_" in name or name.startswith("ln_f"):
            arrays[name] += numpy.float32(1.0) if name.endswith(".weight") else numpy.float32(0.0)
    path = str(tmp_path / "gpt2.npz")
    checkpoint.save_interchange(path, arrays)
    _, loaded = checkpoint.load_interchange(path, heads=H)
    trainer = make_trainer(source=loaded.__getitem__)
    inputs, targets = trainer.data.batch(0, 4)
    want = gpt2_reference_loss(loaded, inputs, targets, H)
    # The step's loss is the mean over all B*S targets with the weights before the update.
    assert trainer.train_step()["loss"] == pytest.approx(want, rel=1e-6)
