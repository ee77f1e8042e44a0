"""The data order and the token files of docs/data.md (a contract).

Expected values are written out by hand from the contract: with global batch B, sequence length S and
N = (len(t) - 1) // S sequences, step k uses n = (k*B + j) mod N for j = 0..B-1, input t[n*S : n*S+S],
target t[n*S+1 : n*S+S+1].
"""

import re

import numpy
import pytest

from mpmp.data import TokenData, builtin_corpus, load_tokens
from mpmp.errors import DataError


def offset_stream(n, base=1000):
    """t[i] = base + i: a token's value says where it sits in the stream."""
    return numpy.arange(base, base + n, dtype=numpy.int64)


# ---------------------------------------------------------------------------------------------
# Sequential order
# ---------------------------------------------------------------------------------------------


def test_sequence_count_is_len_minus_one_over_seq_len():
    # 99 tokens, S = 4: (99 - 1) // 4 = 24. 97 tokens: 96 // 4 = 24 (the last target ends at t[96]).
    assert TokenData(offset_stream(99), 4, 2000).num_sequences == 24
    assert TokenData(offset_stream(97), 4, 2000).num_sequences == 24
    # 96 tokens: 95 // 4 = 23; sequence 23 would need t[96] as its last target.
    assert TokenData(offset_stream(96), 4, 2000).num_sequences == 23


def test_step_three_uses_sequences_fifteen_to_nineteen():
    # B = 5, S = 4, N = 24: step 3 uses n = 15, 16, 17, 18, 19; n = 15 starts at token 60.
    data = TokenData(offset_stream(99), 4, 2000)
    assert data.sequence_indices(3, 5).tolist() == [15, 16, 17, 18, 19]
    inputs, targets = data.batch(3, 5)
    assert inputs.shape == (5, 4) and targets.shape == (5, 4)
    assert inputs[0].tolist() == [1060, 1061, 1062, 1063]
    assert targets[0].tolist() == [1061, 1062, 1063, 1064]
    assert inputs[1].tolist() == [1064, 1065, 1066, 1067]
    assert inputs[4].tolist() == [1076, 1077, 1078, 1079]
    assert targets[4].tolist() == [1077, 1078, 1079, 1080]


def test_first_step_starts_at_the_first_token():
    data = TokenData(offset_stream(99), 4, 2000)
    inputs, targets = data.batch(0, 2)
    assert inputs.tolist() == [[1000, 1001, 1002, 1003], [1004, 1005, 1006, 1007]]
    assert targets.tolist() == [[1001, 1002, 1003, 1004], [1005, 1006, 1007, 1008]]


def test_batches_are_int64():
    inputs, targets = TokenData(numpy.arange(50, dtype=numpy.uint16), 4, 256).batch(0, 2)
    assert inputs.dtype == numpy.int64 and targets.dtype == numpy.int64


def test_order_wraps_around_past_the_last_sequence():
    # N = 24, B = 5: step 4 is n = 20, 21, 22, 23, 0; step 5 is n = 25..29 mod 24 = 1..5.
    data = TokenData(offset_stream(99), 4, 2000)
    assert data.sequence_indices(4, 5).tolist() == [20, 21, 22, 23, 0]
    assert data.sequence_indices(5, 5).tolist() == [1, 2, 3, 4, 5]
    inputs, targets = data.batch(4, 5)
    assert inputs[3].tolist() == [1092, 1093, 1094, 1095]
    assert targets[3].tolist() == [1093, 1094, 1095, 1096]
    assert inputs[4].tolist() == [1000, 1001, 1002, 1003]
    assert targets[4].tolist() == [1001, 1002, 1003, 1004]


def test_global_batch_larger_than_the_stream_repeats_sequences():
    # N = 3 (10 tokens, S = 3), B = 7: n = 0, 1, 2, 0, 1, 2, 0; step 1: n = 7..13 mod 3.
    data = TokenData(offset_stream(10), 3, 2000)
    assert data.sequence_indices(0, 7).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert data.sequence_indices(1, 7).tolist() == [1, 2, 0, 1, 2, 0, 1]
    inputs, targets = data.batch(1, 7)
    assert inputs[0].tolist() == [1003, 1004, 1005]
    assert targets[1].tolist() == [1007, 1008, 1009]


def test_sequential_order_at_a_large_step():
    # Step 1000, B = 5, N = 24: k*B = 5000 = 208*24 + 8, so n = 8, 9, 10, 11, 12.
    data = TokenData(offset_stream(99), 4, 2000)
    assert data.sequence_indices(1000, 5).tolist() == [8, 9, 10, 11, 12]
    inputs, _ = data.batch(1000, 5)
    assert inputs[0].tolist() == [1032, 1033, 1034, 1035]


def test_batch_slice_takes_consecutive_sequences_of_the_step():
    data = TokenData(offset_stream(99), 4, 2000)
    inputs, targets = data.batch(3, 5, first=2, count=2)
    # Sequences 17 and 18 of step 3.
    assert inputs.tolist() == [[1068, 1069, 1070, 1071], [1072, 1073, 1074, 1075]]
    assert targets.tolist() == [[1069, 1070, 1071, 1072], [1073, 1074, 1075, 1076]]


def test_replicas_take_consecutive_slices_that_make_up_the_global_batch():
    data = TokenData(offset_stream(99), 4, 2000)
    # B = 6, dp = 3, step 2: n = 12..17; replica r gets n = 12 + 2r, 13 + 2r.
    for r, first in enumerate((12, 14, 16)):
        inputs, targets = data.replica_batch(2, 6, r, 3)
        s = 1000 + 4 * first
        assert inputs.tolist() == [list(range(s, s + 4)), list(range(s + 4, s + 8))]
        assert targets.tolist() == [list(range(s + 1, s + 5)), list(range(s + 5, s + 9))]
    for dp in (1, 2, 3, 6):
        for step in (0, 2, 7):
            parts = [data.replica_batch(step, 6, r, dp) for r in range(dp)]
            full_in, full_tg = data.batch(step, 6)
            numpy.testing.assert_array_equal(numpy.concatenate([p[0] for p in parts]), full_in)
            numpy.testing.assert_array_equal(numpy.concatenate([p[1] for p in parts]), full_tg)


def test_micro_batches_take_consecutive_slices_of_the_replica_share():
    from mpmp.model.gpt import split_microbatches

    data = TokenData(offset_stream(99), 4, 2000)
    # B = 8, dp = 2, M = 2, step 1: n = 8..15; replica 1 holds n = 12..15, in micro-batches 12-13, 14-15.
    inputs, targets = data.replica_batch(1, 8, 1, 2)
    mbs = split_microbatches(inputs, targets, 2, 1.0 / (8 * 4))
    assert [mb.inputs[:, 0].tolist() for mb in mbs] == [[1048, 1052], [1056, 1060]]
    assert [mb.targets[:, -1].tolist() for mb in mbs] == [[1052, 1056], [1060, 1064]]
    assert mbs[0].loss_scale == 1.0 / 32


# ---------------------------------------------------------------------------------------------
# Shuffled order
# ---------------------------------------------------------------------------------------------


def shuffled_epochs(data, global_batch, epochs):
    n = data.num_sequences
    steps = -(-epochs * n // global_batch)
    seen = numpy.concatenate([data.sequence_indices(k, global_batch) for k in range(steps)])
    return [seen[e * n : (e + 1) * n] for e in range(epochs)]


def test_shuffled_order_is_a_permutation_in_every_epoch():
    # N = 24 with B = 5: steps straddle epoch boundaries.
    data = TokenData(offset_stream(99), 4, 2000, order="shuffled", seed=7)
    epochs = shuffled_epochs(data, 5, 3)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(24))
    assert not numpy.array_equal(epochs[0], numpy.arange(24))
    assert not numpy.array_equal(epochs[0], epochs[1])


def test_shuffled_batch_holds_the_sequences_it_names():
    data = TokenData(offset_stream(99), 4, 2000, order="shuffled", seed=7)
    n = data.sequence_indices(6, 5)
    inputs, targets = data.batch(6, 5)
    for j, nj in enumerate(n.tolist()):
        assert inputs[j].tolist() == list(range(1000 + 4 * nj, 1004 + 4 * nj))
        assert targets[j].tolist() == list(range(1001 + 4 * nj, 1005 + 4 * nj))


def test_shuffled_order_depends_on_the_seed():
    a = TokenData(offset_stream(99), 4, 2000, order="shuffled", seed=1)
    b = TokenData(offset_stream(99), 4, 2000, order="shuffled", seed=2)
    a2 = TokenData(offset_stream(99), 4, 2000, order="shuffled", seed=1)
    ea, eb, ea2 = (shuffled_epochs(d, 4, 2) for d in (a, b, a2))
    assert not numpy.array_equal(ea[0], eb[0])
    for x, y in zip(ea, ea2):
        numpy.testing.assert_array_equal(x, y)


def test_shuffled_order_does_not_depend_on_the_order_steps_are_asked_in():
    # A resumed run starts in a late epoch: its permutation must be the one a long run would use.
    fresh = TokenData(offset_stream(99), 4, 2000, order="shuffled", seed=3)
    late = TokenData(offset_stream(99), 4, 2000, order="shuffled", seed=3)
    late_first = late.sequence_indices(11, 5).copy()  # epoch 2 (sequences 55..59)
    early = [late.sequence_indices(k, 5).copy() for k in range(11)]
    expected = [fresh.sequence_indices(k, 5) for k in range(12)]
    for got, want in zip(early + [late_first], expected):
        numpy.testing.assert_array_equal(got, want)


def test_shuffled_order_is_the_same_for_every_data_parallel_split():
    ref = TokenData(offset_stream(99), 4, 2000, order="shuffled", seed=5)
    for dp in (1, 2, 3, 6):
        # Each replica has its own TokenData, as each rank does.
        ranks = [TokenData(offset_stream(99), 4, 2000, order="shuffled", seed=5) for _ in range(dp)]
        for step in (0, 3, 4, 9):
            parts = [d.replica_batch(step, 6, r, dp) for r, d in enumerate(ranks)]
            full_in, full_tg = ref.batch(step, 6)
            numpy.testing.assert_array_equal(numpy.concatenate([p[0] for p in parts]), full_in)
            numpy.testing.assert_array_equal(numpy.concatenate([p[1] for p in parts]), full_tg)


def test_unknown_order_is_refused():
    with pytest.raises(DataError, match="random"):
        TokenData(offset_stream(99), 4, 2000, order="random")


# ---------------------------------------------------------------------------------------------
# Token files
# ---------------------------------------------------------------------------------------------


def test_bin_file_is_little_endian_uint16(tmp_path):
    path = tmp_path / "tokens.bin"
    # 258 = 0x0102 -> bytes 02 01; 65535 -> ff ff; 7 -> 07 00.
    path.write_bytes(bytes([0x02, 0x01, 0xFF, 0xFF, 0x07, 0x00, 0x00, 0x00]))
    tokens, vocab = load_tokens(str(path))
    assert numpy.asarray(tokens).tolist() == [258, 65535, 7, 0]
    assert vocab == 65536


def test_bin_file_written_by_numpy_round_trips(tmp_path):
    path = tmp_path / "tokens.bin"
    values = numpy.array([5, 50256, 300, 0, 1, 2], dtype="<u2")
    values.tofile(path)
    tokens, vocab = load_tokens(str(path))
    assert numpy.asarray(tokens).tolist() == [5, 50256, 300, 0, 1, 2]
    assert vocab == 50257


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint16", "uint8"])
def test_npy_file_is_a_one_dimensional_integer_array(tmp_path, dtype):
    path = tmp_path / "tokens.npy"
    numpy.save(path, numpy.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=dtype))
    tokens, vocab = load_tokens(str(path))
    assert numpy.asarray(tokens).tolist() == [3, 1, 4, 1, 5, 9, 2, 6]
    assert vocab == 10


def test_any_other_file_is_its_bytes_with_vocabulary_256(tmp_path):
    path = tmp_path / "story.txt"
    path.write_bytes(b"Hi!\n\xff")
    tokens, vocab = load_tokens(str(path))
    assert numpy.asarray(tokens).tolist() == [72, 105, 33, 10, 255]
    assert vocab == 256


def test_no_path_gives_the_builtin_corpus():
    tokens, vocab = load_tokens(None)
    assert vocab == 256
    assert tokens.ndim == 1 and tokens.size > 10_000
    assert int(tokens.max()) < 256
    numpy.testing.assert_array_equal(tokens, builtin_corpus())
    # Usable as is: the default model's S = 128 and B = 16 fit in it.
    data = TokenData(tokens, 128, vocab, name="built-in corpus")
    inputs, targets = data.batch(0, 16)
    assert inputs.shape == (16, 128)


def test_files_feed_the_data_order(tmp_path):
    path = tmp_path / "tokens.bin"
    numpy.arange(40, dtype="<u2").tofile(path)
    tokens, vocab = load_tokens(str(path))
    data = TokenData(tokens, 3, vocab, name=str(path))
    # N = 39 // 3 = 13; step 2 with B = 4: n = 8..11.
    inputs, targets = data.batch(2, 4)
    assert inputs[0].tolist() == [24, 25, 26]
    assert targets[3].tolist() == [34, 35, 36]


# ---------------------------------------------------------------------------------------------
# Errors: DataError with the file and the numbers in the message
# ---------------------------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "nope.bin")
    with pytest.raises(DataError) as err:
        load_tokens(path)
    assert path in str(err.value)


def test_odd_sized_bin_file_names_the_path_and_its_size(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError) as err:
        load_tokens(str(path))
    assert str(path) in str(err.value)
    assert re.search(r"\b3\b", str(err.value))


def test_two_dimensional_npy_is_refused(tmp_path):
    path = tmp_path / "grid.npy"
    numpy.save(path, numpy.zeros((4, 8), dtype=numpy.int64))
    with pytest.raises(DataError) as err:
        load_tokens(str(path))
    assert str(path) in str(err.value)
    assert "2-D" in str(err.value)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float_npy_is_refused(tmp_path, dtype):
    path = tmp_path / "floats.npy"
    numpy.save(path, numpy.arange(20, dtype=dtype))
    with pytest.raises(DataError) as err:
        load_tokens(str(path))
    assert str(path) in str(err.value)
    assert dtype in str(err.value)


def test_negative_token_ids_are_refused(tmp_path):
    path = tmp_path / "neg.npy"
    numpy.save(path, numpy.array([4, 2, -5, 7, 1, 1, 1, 1, 1], dtype=numpy.int32))
    with pytest.raises(DataError) as err:
        load_tokens(str(path))
    assert str(path) in str(err.value)
    assert "-5" in str(err.value)


def test_token_id_not_below_vocab_names_the_id_and_the_vocab(tmp_path):
    path = tmp_path / "big.npy"
    numpy.save(path, numpy.array([1, 2, 300, 4] * 10, dtype=numpy.int64))
    tokens, _ = load_tokens(str(path))
    with pytest.raises(DataError) as err:
        TokenData(tokens, 4, 256, name=str(path))
    msg = str(err.value)
    assert str(path) in msg
    assert "300" in msg and "256" in msg


def test_token_id_equal_to_vocab_is_refused_and_one_below_accepted():
    tokens = numpy.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 256], dtype=numpy.int64)
    with pytest.raises(DataError, match="256"):
        TokenData(tokens, 4, 256)
    TokenData(tokens, 4, 257)


def test_too_few_tokens_for_one_sequence_names_the_counts():
    # A sequence of length 8 needs 9 tokens (8 inputs plus the last target).
    with pytest.raises(DataError) as err:
        TokenData(offset_stream(8), 8, 2000, name="tiny.bin")
    msg = str(err.value)
    assert "tiny.bin" in msg
    assert re.search(r"\b8\b", msg) and re.search(r"\b9\b", msg)
    assert TokenData(offset_stream(9), 8, 2000).num_sequences == 1


def test_empty_token_file_is_refused(tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    with pytest.raises(DataError) as err:
        tokens, vocab = load_tokens(str(path))
        TokenData(tokens, 4, 256, name=str(path))
    assert str(path) in str(err.value)


def test_directory_is_refused(tmp_path):
    with pytest.raises(DataError) as err:
        load_tokens(str(tmp_path))
    assert str(tmp_path) in str(err.value)
