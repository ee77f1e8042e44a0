"""Generation (docs/generate.md): the KV cache against full recomputation, on one process and on tp 2,
pp 2 and tp 2 x pp 2; seeded sampling the same on every layout; the vocab-parallel sampler against
Hugging Face's warpers; KV cache bytes against their formula; Hugging Face GPT-2 safetensors against a
torch reference; the command line's errors; `python -m mpmp.data prepare`; fine-tuning from safetensors.

Every file is made here (tiny safetensors, tokenizer.json): no downloads. MPI tests run with
`mpirun -n 4 bash tests/mpi_rank.sh --with-mpi -m mpi tests/test_generate.py`.
"""

import json
import os
import time

import numpy
import pytest
from helpers import MPIRUN, assert_one_clear_error, gpt2_reference_logits, random_weights, run_module

from mpmp import weights as W
from mpmp.comm import ledger
from mpmp.comm.grid import LocalGrid
from mpmp.comm.group import SelfGroup
from mpmp.config import ModelConfig
from mpmp.errors import CheckpointError, ConfigError
from mpmp.inference import sampling as S
from mpmp.inference.generator import Generator, inference_model, plan_micro_batches
from mpmp.inference.kv_cache import KVCache, kv_cache_bytes
from mpmp.model.gpt import GPT, MicroBatch
from mpmp.nn import functional as F
from mpmp.nn.layers import Block

CFG = ModelConfig(vocab=37, seq_len=32, d_model=32, layers=3, heads=4)  # V not divisible by tp 2
PROMPTS = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11], [3, 3], [20, 21, 22]]
NEW = 10
SAMPLED = S.Sampling(temperature=0.9, top_k=12, top_p=0.9, seed=5)


def varied_weights(cfg=CFG, seed=0) -> dict:
    """Random weights whose blocks outweigh the tied embedding, so that greedy decoding does not just
    repeat the last token: a token-for-token comparison then means something."""
    w = random_weights(cfg, seed)
    big = [k for k in w if k.startswith("h.") and k.endswith("weight") and ".ln_" not in k]
    return {k: v * numpy.float32(8) if k in big else v for k, v in w.items()}


def last_logits(model, ids) -> numpy.ndarray:
    """The last position's logits [B, V] from the training forward over the whole sequence (no cache)."""
    chunk = model.chunks[0]
    mb = MicroBatch(ids, ids, 1.0)
    x = None
    for m in chunk.modules[:-1]:
        x, _ = m.forward(x, mb)
    head = chunk.modules[-1]
    h, _ = head.ln_f.forward(x)
    logits, _ = head.lm.forward(h)
    return logits[:, -1, : model.cfg.vocab]


def recompute_greedy(w, prompts, new=NEW, cfg=CFG) -> list:
    """Greedy decoding by full recomputation: the training forward over the whole sequence per token."""
    model = GPT(cfg, w.__getitem__)
    out = []
    for p in prompts:
        ids = numpy.array([p], dtype=numpy.int64)
        for _ in range(new):
            token = int(last_logits(model, ids)[0].argmax())
            ids = numpy.concatenate([ids, [[token]]], axis=1)
        out.append(ids[0, len(p) :].tolist())
    return out


def one_process(w, prompts=PROMPTS, sampling=S.GREEDY_SAMPLING, **kw) -> list:
    grid = LocalGrid()
    return Generator(inference_model(CFG, w.__getitem__, grid), grid, sampling=sampling, **kw).generate(
        prompts, max_new_tokens=NEW
    )


# ---------------------------------------------------------------------------------------------
# The kernel and the cache
# ---------------------------------------------------------------------------------------------


def test_attention_over_a_cache_equals_the_rows_of_full_causal_attention(rng):
    q, k, v = (rng.standard_normal((2, 3, 7, 4)) for _ in range(3))
    full, _ = F.attention_forward(q, k, v)
    assert numpy.array_equal(F.attention_forward_kv(q, k, v), full)  # prefill: the training kernel's numbers
    for start in (1, 4, 6):  # the newest 7 - start positions against every key so far
        numpy.testing.assert_allclose(F.attention_forward_kv(q[:, :, start:], k, v), full[:, :, start:], rtol=1e-12)


def test_cached_logits_equal_recomputed_logits_at_every_step():
    w = varied_weights()
    model = GPT(CFG, w.__getitem__)
    chunk = model.chunks[0]
    ids = numpy.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    kv = KVCache.for_chunk(chunk, batch=2, capacity=4 + NEW, heads=CFG.heads, head_dim=CFG.head_dim)
    logits = chunk.forward_kv(ids, kv)
    for _ in range(NEW):
        numpy.testing.assert_allclose(logits[:, : CFG.vocab], last_logits(model, ids), rtol=1e-5, atol=1e-5)
        token = logits.argmax(axis=1)[:, None]
        ids = numpy.concatenate([ids, token], axis=1)
        logits = chunk.forward_kv(token, kv)
    assert kv.length == ids.shape[1]  # every token fed, the last one included


def test_cached_generation_equals_full_recomputation_on_one_process():
    w = varied_weights()
    want = recompute_greedy(w, PROMPTS)
    assert len({t for row in want for t in row}) > 10  # the comparison is not between constant rows
    assert one_process(w) == want
    assert one_process(w, use_cache=False) == want
    assert one_process(w, micro_batches=5) == want  # one prompt per micro-batch


def test_kv_cache_bytes_equal_the_formula_on_one_process():
    grid = LocalGrid()
    gen = Generator(inference_model(CFG, varied_weights().__getitem__, grid), grid)
    gen.generate(PROMPTS, max_new_tokens=NEW)
    lengths = sorted({len(p) for p in PROMPTS})  # one micro-batch per prompt length
    counts = {n: sum(len(p) == n for p in PROMPTS) for n in lengths}
    hd = CFG.d_model // CFG.heads
    want = sum(2 * CFG.layers * counts[n] * CFG.heads * (n + NEW - 1) * hd * 4 for n in lengths)
    assert gen.kv_bytes == want
    assert kv_cache_bytes(layers=3, batch=2, heads=4, capacity=13, head_dim=8) == 2 * 3 * 2 * 4 * 13 * 8 * 4


def test_prompts_of_one_length_share_a_micro_batch_split_to_fill_the_pipeline():
    assert plan_micro_batches([4, 3, 4, 2, 3], 1) == [[0, 2], [1, 4], [3]]
    assert plan_micro_batches([5] * 8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert plan_micro_batches([5] * 3, 4) == [[0], [1], [2]]
    assert plan_micro_batches([], 2) == []  # a data-parallel replica left without prompts


# ---------------------------------------------------------------------------------------------
# Sampling over a vocabulary split across ranks (here one rank; the MPI tests split it)
# ---------------------------------------------------------------------------------------------


def hf_keep(logits, top_k=0, top_p=1.0):
    """Which tokens Hugging Face's TopKLogitsWarper then TopPLogitsWarper keep (their algorithm)."""
    x = logits.astype(numpy.float64).copy()
    if top_k:
        kth = numpy.sort(x, axis=1)[:, -top_k][:, None]
        x[x < kth] = -numpy.inf
    if top_p < 1:
        order = numpy.argsort(x, axis=1, kind="stable")
        sx = numpy.take_along_axis(x, order, axis=1)
        p = numpy.exp(sx - sx.max(axis=1, keepdims=True))
        cum = numpy.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)
        remove = cum <= 1 - top_p
        remove[:, -1] = False  # min_tokens_to_keep = 1
        numpy.put_along_axis(x, order, numpy.where(remove, -numpy.inf, sx), axis=1)
    return numpy.isfinite(x)


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.7), (8, 0.8), (0, 0.97)])
def test_top_k_and_top_p_keep_what_hugging_face_keeps(rng, top_k, top_p):
    # 200 columns: a nucleus of p = 0.97 over these flat rows is wider than the exact candidates,
    # so the whole-row fallback is exercised as well
    logits = rng.standard_normal((6, 200)) * numpy.array([[0.3], [1], [2], [4], [0.1], [3]])
    x = logits.copy()
    group = SelfGroup("tp")
    if top_k:
        S._mask_below(x, S._top_k_threshold(x, top_k, group))
    if top_p < 1:
        S._mask_below(x, S._top_p_threshold(x, top_p, group))
    assert numpy.array_equal(numpy.isfinite(x), hf_keep(logits, top_k, top_p))


def test_greedy_is_the_first_argmax_of_the_row(rng):
    logits = rng.standard_normal((4, 37)).astype(numpy.float32)
    logits[0, [3, 9]] = 10.0  # a tie: the lower index wins
    shard = S.VocabShard(0, 37, 37)
    got = S.next_tokens(logits, shard=shard, group=SelfGroup("tp"), sampling=S.Sampling(), prompts=range(4), step=0)
    assert got.tolist() == logits.argmax(axis=1).tolist() and got[0] == 3


def test_sampling_draws_from_the_softmax_with_the_seeded_noise():
    logits = numpy.log(numpy.array([[0.1, 0.2, 0.3, 0.4]], dtype=numpy.float32))
    shard, group = S.VocabShard(0, 4, 4), SelfGroup("tp")
    draws = [
        int(S.next_tokens(logits, shard=shard, group=group, sampling=S.Sampling(1.0, seed=3), prompts=[0], step=s)[0])
        for s in range(4000)
    ]
    freq = numpy.bincount(draws, minlength=4) / len(draws)
    numpy.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.025)
    again = [
        int(S.next_tokens(logits, shard=shard, group=group, sampling=S.Sampling(1.0, seed=3), prompts=[0], step=s)[0])
        for s in range(50)
    ]
    assert again == draws[:50]


def test_seeded_sampling_does_not_depend_on_micro_batches_or_the_cache():
    w = varied_weights()
    want = one_process(w, sampling=SAMPLED)
    assert want != one_process(w)  # not greedy in disguise
    assert one_process(w, sampling=SAMPLED, micro_batches=5) == want
    assert one_process(w, sampling=SAMPLED, use_cache=False) == want


# ---------------------------------------------------------------------------------------------
# Hugging Face GPT-2 files
# ---------------------------------------------------------------------------------------------


def hf_state_dict(w: dict, *, prefix="transformer.", tied=True, buffers=True) -> dict:
    """Arrays named as transformers' GPT2LMHeadModel.state_dict() (Conv1D weights are [in, out])."""
    out = {prefix + k: v for k, v in w.items()}
    s = w["wpe.weight"].shape[0]
    layers = sum(1 for k in w if k.endswith(".ln_1.weight"))
    for i in range(layers if buffers else 0):  # the causal mask buffers some versions save
        out[f"{prefix}h.{i}.attn.bias"] = numpy.tril(numpy.ones((s, s), numpy.float32)).reshape(1, 1, s, s)
        out[f"{prefix}h.{i}.attn.masked_bias"] = numpy.array(-1e4, numpy.float32)
    head = w["wte.weight"] if tied else numpy.random.default_rng(9).standard_normal(w["wte.weight"].shape)
    out["lm_head.weight"] = numpy.array(head, numpy.float32)  # a copy: safetensors refuses shared memory
    return out


def write_hf_model(folder, w, heads=CFG.heads, config=True, torch=False, **kw) -> str:
    """model.safetensors (written from torch tensors with torch=True) and its config.json."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.safetensors")
    if torch:
        import torch as th
        from safetensors.torch import save_file

        save_file({k: th.from_numpy(v) for k, v in hf_state_dict(w, **kw).items()}, path)
    else:
        from safetensors.numpy import save_file

        save_file(hf_state_dict(w, **kw), path)
    if config:
        v, d = w["wte.weight"].shape
        cfg = {"model_type": "gpt2", "n_head": heads, "n_embd": d, "vocab_size": v, "n_positions": 32}
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg, f)
    return path


def torch_gpt2_logits(sd: dict, ids, heads: int):
    """GPT-2 as transformers computes it (GPT2LMHeadModel, eval mode), from its state dict, in float64."""
    import torch
    import torch.nn.functional as TF

    sd = {k.removeprefix("transformer."): v.double() for k, v in sd.items()}
    ids = torch.as_tensor(ids)
    b, t = ids.shape
    d = sd["wte.weight"].shape[1]

    def conv1d(x, name):  # transformers' Conv1D: addmm(bias, x, weight), weight [in, out]
        return torch.addmm(sd[name + ".bias"], x.reshape(-1, x.shape[-1]), sd[name + ".weight"]).view(b, t, -1)

    def ln(x, name):
        return TF.layer_norm(x, (d,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)

    x = sd["wte.weight"][ids] + sd["wpe.weight"][:t]
    layers = sum(1 for k in sd if k.endswith(".ln_1.weight"))
    for i in range(layers):
        p = f"h.{i}."
        q, k, v = conv1d(ln(x, p + "ln_1"), p + "attn.c_attn").split(d, dim=2)
        q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
        a = TF.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + conv1d(a, p + "attn.c_proj")
        h = TF.gelu(conv1d(ln(x, p + "ln_2"), p + "mlp.c_fc"), approximate="tanh")  # gelu_new
        x = x + conv1d(h, p + "mlp.c_proj")
    return (ln(x, "ln_f") @ sd["lm_head.weight"].T).numpy()


def test_hf_safetensors_give_the_logits_of_torch_and_numpy_gpt2(tmp_path):
    pytest.importorskip("torch")
    w = varied_weights()
    path = write_hf_model(tmp_path, w, torch=True)
    from safetensors.torch import load_file

    cfg, arrays = W.load(path)
    assert cfg == CFG  # heads from config.json, the rest from the shapes
    ids = numpy.array([[1, 5, 9, 2, 30, 4], [7, 7, 3, 36, 0, 11]])
    model = GPT(cfg, arrays.__getitem__)
    logits = numpy.stack([last_logits(model, ids[:, : n + 1]) for n in range(6)], axis=1)
    want_torch = torch_gpt2_logits(load_file(path), ids, CFG.heads)
    numpy.testing.assert_allclose(logits, want_torch, rtol=1e-4, atol=1e-4)
    numpy.testing.assert_allclose(logits, gpt2_reference_logits(w, ids, CFG.heads), rtol=1e-4, atol=1e-4)


def test_hf_names_load_with_or_without_the_prefix_and_buffers(tmp_path):
    w = varied_weights()
    a = W.load(write_hf_model(tmp_path / "a", w))[1]
    b = W.load(write_hf_model(tmp_path / "b", w, prefix="", buffers=False))[1]
    assert sorted(a) == sorted(w) and all(numpy.array_equal(a[k], b[k]) and numpy.array_equal(a[k], w[k]) for k in w)


def test_an_untied_lm_head_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="lm_head.weight .* differs from wte.weight"):
        W.load(write_hf_model(tmp_path, varied_weights(), tied=False))


def test_heads_from_config_json_and_a_disagreeing_flag(tmp_path):
    path = write_hf_model(tmp_path, varied_weights(), heads=2)
    assert W.load(path)[0].heads == 2
    assert W.load(path, heads=2)[0].heads == 2
    with pytest.raises(ConfigError, match="--heads 4 disagrees with .*config.json \\(2 heads\\)"):
        W.load(path, heads=4)


# ---------------------------------------------------------------------------------------------
# The command line: python -m mpmp.generate, python -m mpmp.data prepare, train --init-from
# ---------------------------------------------------------------------------------------------

TEXT = "the quick brown fox jumps over the lazy dog; the dog sleeps, the fox runs. " * 4


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained here, and a GPT-2 of its vocabulary as model.safetensors."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("gpt2")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(folder / "tokenizer.json"))
    cfg = ModelConfig(vocab=tok.get_vocab_size(), seq_len=32, d_model=32, layers=2, heads=4)
    model = write_hf_model(folder, varied_weights(cfg))
    return {"model": model, "tokenizer": str(folder / "tokenizer.json"), "cfg": cfg, "tok": tok}


def test_generate_writes_text_and_json_lines_in_prompt_order(hf_files, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = run_module(
        "mpmp.generate",
        *("--init-from", hf_files["model"], "--tokenizer", hf_files["tokenizer"], "--max-new-tokens", 6),
        *("--prompt", "the fox", "--prompt-tokens", "5,6,7", "--prompt", "the lazy dog", "--output", out),
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    tok = hf_files["tok"]
    assert [x["prompt_tokens"] for x in lines] == [tok.encode("the fox").ids, [5, 6, 7], tok.encode("the lazy dog").ids]
    assert all(len(x["tokens"]) == 6 and x["text"] == tok.decode(x["tokens"]) for x in lines)
    assert proc.stdout.splitlines()[0].startswith("the fox")
    assert "KV cache" in proc.stderr
    # the same tokens as the Generator on one process (greedy, the default)
    cfg, arrays = W.load(hf_files["model"])
    grid = LocalGrid()
    gen = Generator(inference_model(cfg, arrays.__getitem__, grid), grid)
    assert gen.generate([x["prompt_tokens"] for x in lines], max_new_tokens=6) == [x["tokens"] for x in lines]


def test_generate_streams_a_single_prompt_from_an_interchange_file(tmp_path):
    from mpmp import checkpoint

    cfg = ModelConfig(vocab=256, seq_len=32, d_model=32, layers=2, heads=4)
    checkpoint.save_interchange(str(tmp_path / "m.npz"), varied_weights(cfg))
    proc = run_module(
        "mpmp.generate", "--init-from", tmp_path / "m.npz", "--prompt", "Hi", "--max-new-tokens", 5, "--quiet"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Hi") and proc.stderr == ""


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--tokenizer", "no-such-tokenizer.json", "--prompt", "x"], "no-such-tokenizer.json: file not found"),
        (["--prompt-tokens", "1,2,400"], "token 400 is not below the model's vocabulary size"),
        (["--prompt", "the fox", "--max-new-tokens", 40], "exceed the model's context of 32 positions"),
        (["--prompt", "the fox", "--heads", 2], "--heads 2 disagrees with"),
        (["--prompt", "x", "--top-p", 1.5], "--top-p must be in (0, 1]"),
        (["--prompt", "x", "--tp", 2], "world size (1) must be divisible by tp*pp"),
    ],
)
def test_generate_refuses_bad_input_with_one_line(hf_files, flags, needle):
    flags = flags if "--tokenizer" in flags else ["--tokenizer", hf_files["tokenizer"], *flags]
    assert_one_clear_error(run_module("mpmp.generate", "--init-from", hf_files["model"], *flags), needle)


def test_generate_from_a_checkpoint_folder_equals_generating_from_its_export(hf_files, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = run_module("mpmp.train", *TRAIN, "--init-from", hf_files["model"], "--save", ckpt)
    assert proc.returncode == 0, proc.stderr
    assert run_module("mpmp.checkpoint", "export", ckpt, tmp_path / "m.npz").returncode == 0
    outs = []
    for source in (ckpt, tmp_path / "m.npz"):
        out = tmp_path / f"{source.name}.jsonl"
        flags = ["--tokenizer", hf_files["tokenizer"], "--prompt", "the dog", "--max-new-tokens", 8, "--output", out]
        proc = run_module("mpmp.generate", "--init-from", source, *flags, "--quiet")  # heads: the manifest's, 4
        assert proc.returncode == 0, proc.stderr
        outs.append(out.read_text())
    assert outs[0] == outs[1]


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun")
@pytest.mark.parametrize("layout", [("2", "2"), ("1", "2")], ids=["tp2-pp2", "pp2-dp2"])
def test_generate_under_mpirun_writes_what_one_process_writes(hf_files, tmp_path, layout):
    prompts = ["--prompt", "the fox", "--prompt", "the lazy dog", "--prompt-tokens", "5,6,7"]
    if layout == ("1", "2"):
        prompts = prompts[:2]  # one prompt for two data-parallel replicas: the second has none
    common = ["--init-from", hf_files["model"], "--tokenizer", hf_files["tokenizer"], *prompts, "--quiet"]
    common += ["--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "20", "--seed", "3"]
    one = run_module("mpmp.generate", *common, "--output", tmp_path / "one.jsonl")
    assert one.returncode == 0, one.stderr
    four = run_module(
        "mpmp.generate",
        *common,
        "--tp",
        layout[0],
        "--pp",
        layout[1],
        "--output",
        tmp_path / "four.jsonl",
        n=4,
        timeout=180,
    )
    assert four.returncode == 0, four.stderr
    assert (tmp_path / "four.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert four.stdout == one.stdout


def test_generate_refuses_heads_that_do_not_divide_the_model(tmp_path):
    from mpmp import checkpoint

    checkpoint.save_interchange(str(tmp_path / "m.npz"), varied_weights(ModelConfig(256, 32, 32, 1, 4)))
    proc = run_module("mpmp.generate", "--init-from", tmp_path / "m.npz", "--heads", 3, "--prompt", "x")
    assert_one_clear_error(proc, "--heads (3) must divide --d-model (32)")


def test_generate_refuses_an_untied_head(tmp_path):
    path = write_hf_model(tmp_path, varied_weights(), tied=False)
    assert_one_clear_error(run_module("mpmp.generate", "--init-from", path, "--prompt", "x"), "lm_head.weight")


def test_data_prepare_writes_the_tokenizers_ids_as_uint16(hf_files, tmp_path):
    (tmp_path / "in.txt").write_text(TEXT)
    proc = run_module(
        "mpmp.data", "prepare", "--tokenizer", hf_files["tokenizer"], tmp_path / "in.txt", tmp_path / "o.bin"
    )
    assert proc.returncode == 0, proc.stderr
    ids = numpy.fromfile(tmp_path / "o.bin", dtype="<u2")
    assert ids.tolist() == hf_files["tok"].encode(TEXT).ids


def test_data_prepare_refuses_a_vocabulary_beyond_uint16(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"w{i}": i for i in range(70000)}, unk_token="w0")).save(str(tmp_path / "t.json"))
    (tmp_path / "in.txt").write_text("w1 w2")
    proc = run_module(
        "mpmp.data", "prepare", "--tokenizer", tmp_path / "t.json", tmp_path / "in.txt", tmp_path / "o.bin"
    )
    assert_one_clear_error(proc, "70000 tokens does not fit", "65536")
    assert not (tmp_path / "o.bin").exists()


TRAIN = ["--steps", 2, "--seq-len", 16, "--global-batch", 4, "--quiet", "--lr", 1e-3]


def test_training_from_safetensors_equals_training_from_the_interchange_file(hf_files, tmp_path):
    from mpmp import checkpoint

    (tmp_path / "in.txt").write_text(TEXT)
    run_module("mpmp.data", "prepare", "--tokenizer", hf_files["tokenizer"], tmp_path / "in.txt", tmp_path / "d.bin")
    checkpoint.save_interchange(str(tmp_path / "m.npz"), W.load(hf_files["model"])[1])
    losses = []
    for init, name in ((hf_files["model"], "a"), (tmp_path / "m.npz", "b")):
        metrics = tmp_path / f"{name}.jsonl"
        proc = run_module("mpmp.train", *TRAIN, "--data", tmp_path / "d.bin", "--init-from", init, "--metrics", metrics)
        assert proc.returncode == 0, proc.stderr
        losses.append([json.loads(x)["loss"] for x in metrics.read_text().splitlines()])
    assert losses[0] == losses[1]


def test_init_from_with_resume_auto_starts_from_the_weights_then_resumes(hf_files, tmp_path):
    (tmp_path / "in.txt").write_text(TEXT)
    run_module("mpmp.data", "prepare", "--tokenizer", hf_files["tokenizer"], tmp_path / "in.txt", tmp_path / "d.bin")
    common = [*TRAIN, "--data", tmp_path / "d.bin", "--init-from", hf_files["model"], "--resume", "auto"]
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    first = run_module("mpmp.train", *common, "--save", ckpt, "--metrics", metrics)
    assert first.returncode == 0, first.stderr
    plain = run_module(
        "mpmp.train",
        *TRAIN,
        "--data",
        tmp_path / "d.bin",
        "--init-from",
        hf_files["model"],
        "--metrics",
        tmp_path / "p.jsonl",
    )
    assert plain.returncode == 0, plain.stderr
    loss = [json.loads(x)["loss"] for x in metrics.read_text().splitlines()]
    assert loss == [json.loads(x)["loss"] for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    second = run_module("mpmp.train", *common, "--steps", 3, "--save", ckpt, "--metrics", metrics)
    assert second.returncode == 0, second.stderr
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3]  # resumed at 2
    refused = run_module("mpmp.train", *TRAIN, "--init-from", hf_files["model"], "--resume", ckpt)
    assert_one_clear_error(refused, "--init-from and --resume DIR exclude each other")


# ---------------------------------------------------------------------------------------------
# Layouts (MPI): every rank computes the one-process answer itself and compares
# ---------------------------------------------------------------------------------------------

LAYOUTS = [(2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 2, 2)]


def distributed(comm, layout, w, sampling):
    """(the layout's tokens for PROMPTS in prompt order, this rank's Generator, its grid, its replica's
    prompts)."""
    from mpmp.comm.grid import ProcessGrid
    from mpmp.comm.group import block_sizes

    tp, pp, dp = layout
    grid = ProcessGrid(tp, pp, dp, comm=comm)
    gen = Generator(inference_model(CFG, w.__getitem__, grid), grid, sampling=sampling)
    share = block_sizes(len(PROMPTS), dp)
    first = sum(share[: grid.coord.dp])
    new = gen.generate(PROMPTS[first : first + share[grid.coord.dp]], first_index=first, max_new_tokens=NEW)
    holds = gen.chunk.is_first and grid.coord.tp == 0
    every = comm.allgather(new if holds else None)
    mine = PROMPTS[first : first + share[grid.coord.dp]]
    return [row for part in every if part is not None for row in part], gen, grid, mine


def micro_batches(prompts, pp):
    """(sequences, prompt length) of each micro-batch: prompts of one length together, pp of them."""
    return [(len(g), len(prompts[g[0]])) for g in plan_micro_batches([len(p) for p in prompts], pp)]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "tp{}-pp{}-dp{}".format(*t))
def test_generation_on_a_layout_equals_recomputation_on_one_process(comm_of, layout):
    comm = comm_of(layout[0] * layout[1] * layout[2])
    if comm is None:
        return
    w = varied_weights()
    got, gen, grid, mine = distributed(comm, layout, w, S.Sampling())
    assert got == recompute_greedy(w, PROMPTS)
    # this rank's cache: its stage's blocks, its tp share of the heads, per micro-batch
    layers = sum(isinstance(m, Block) for m in gen.chunk.modules)
    assert 0 < layers < CFG.layers or grid.pp == 1
    hd, heads = CFG.head_dim, CFG.heads // grid.tp
    want = sum(
        kv_cache_bytes(layers=layers, batch=b, heads=heads, capacity=n + NEW - 1, head_dim=hd)
        for b, n in micro_batches(mine, grid.pp)
    )
    assert gen.kv_bytes == want


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "tp{}-pp{}-dp{}".format(*t))
def test_seeded_sampling_gives_the_same_tokens_on_every_layout(comm_of, layout):
    comm = comm_of(layout[0] * layout[1] * layout[2])
    if comm is None:
        return
    w = varied_weights()
    got, *_ = distributed(comm, layout, w, SAMPLED)
    assert got == one_process(w, sampling=SAMPLED)


@pytest.mark.mpi(min_size=2)
def test_vocab_parallel_greedy_moves_only_each_ranks_best(comm_of):
    comm = comm_of(2)
    if comm is None:
        return
    previous = ledger.get()
    led = ledger.install(ledger.Ledger(comm.Get_rank(), keep_events=True))
    try:
        *_, mine = distributed(comm, (2, 1, 1), varied_weights(), S.Sampling())
    finally:
        ledger.install(previous)
    sample = [e for e in led.events if e.label == "sample"]
    # per step and micro-batch one all-gather of (value, index) per row, float64, from both ranks
    want = [2 * b * 2 * 8 for _ in range(NEW) for b, _ in micro_batches(mine, 1)]
    assert [(e.kind, e.group) for e in sample] == [("all_gather", "tp")] * len(want)
    assert [e.nbytes for e in sample] == want


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.7), (8, 0.8), (0, 0.97)])
def test_split_vocabulary_keeps_what_one_rank_keeps(comm_of, top_k, top_p):
    from mpmp.comm.grid import ProcessGrid

    comm = comm_of(2)
    if comm is None:
        return
    group = ProcessGrid(2, 1, 1, comm=comm).tp_group
    logits = numpy.random.default_rng(7).standard_normal((6, 200)) * numpy.array([[0.3], [1], [2], [4], [0.1], [3]])
    x = logits[:, group.rank * 100 : (group.rank + 1) * 100].copy()
    if top_k:
        S._mask_below(x, S._top_k_threshold(x, top_k, group))
    if top_p < 1:
        S._mask_below(x, S._top_p_threshold(x, top_p, group))
    kept = numpy.concatenate(comm.allgather(numpy.isfinite(x)), axis=1)
    assert numpy.array_equal(kept, hf_keep(logits, top_k, top_p))


class SlowChunk:
    """A model chunk whose every forward also sleeps `seconds`: stage costs that other jobs on the
    cores cannot stretch, so the overlap of stages shows in wall-clock time."""

    def __init__(self, chunk, seconds):
        self._chunk, self.seconds = chunk, seconds

    def __getattr__(self, name):
        return getattr(self._chunk, name)

    def forward_kv(self, x, kv):
        time.sleep(self.seconds)
        return self._chunk.forward_kv(x, kv)


@pytest.mark.mpi(min_size=2)
def test_pipeline_stages_work_at_once_on_several_micro_batches(comm_of):
    from mpmp.comm.grid import ProcessGrid

    comm = comm_of(2)
    if comm is None:
        return
    grid = ProcessGrid(1, 2, 1, comm=comm)
    w, unit, steps = varied_weights(), 0.03, 6
    elapsed = {}
    for m in (1, 2):  # the same 4 prompts in one micro-batch (stages take turns) or two (they overlap)
        gen = Generator(inference_model(CFG, w.__getitem__, grid), grid, micro_batches=m)
        gen.chunk = SlowChunk(gen.chunk, unit / m)  # the same stage cost per step either way
        comm.Barrier()
        start = time.perf_counter()
        gen.generate([[1, 2, 3]] * 4, max_new_tokens=steps)
        comm.Barrier()
        elapsed[m] = time.perf_counter() - start
    # one micro-batch: 2 stages x `unit` per step, one after the other; two: the stages work at once,
    # each step costing about one `unit` plus half a unit while the pipeline fills
    assert elapsed[1] > 2 * steps * unit
    assert elapsed[2] < 0.8 * elapsed[1], elapsed
