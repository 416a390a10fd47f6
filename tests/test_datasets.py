"""Datasets, the data-parallel sampler and the model-input helpers (numpy only, single process)."""

import numpy as np
import pytest

from mindspeed_ms.core.datasets import (CharDataset, CharTokenizer, DataParallelBatchSampler, GPTDataset,
                                        IndexedDataset, IndexedDatasetBuilder, SyntheticDataset,
                                        build_model_inputs, collate, get_ltor_masks_and_position_ids, load_text,
                                        parse_split, split_documents, tinyshakespeare_path, write_indexed_dataset)

# ---------------------------------------------------------------------------------------------
# character-level dataset
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shakespeare():
    return load_text()


def test_shipped_corpus_matches_nanogpt_numbers(shakespeare):
    assert tinyshakespeare_path().is_file()
    assert len(shakespeare) == 1115394
    train = CharDataset(shakespeare, seq_length=64, split="train")
    val = CharDataset(shakespeare, seq_length=64, split="validation")
    # nanoGPT's data/shakespeare_char/prepare.py: vocab 65, train 1,003,854, val 111,540 tokens
    assert train.vocab_size == val.vocab_size == 65
    assert len(train.data) == 1003854 and len(val.data) == 111540
    assert train.tokenizer.chars == val.tokenizer.chars
    assert train.tokenizer.decode(train.data[:14]) == shakespeare[:14]
    assert val.tokenizer.decode(val.data[:20]) == shakespeare[1003854:1003874]


def test_tokenizer_round_trip_and_errors(tmp_path):
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"] and tok.vocab_size == 8
    ids = tok.encode("hello")
    assert ids.tolist() == [3, 2, 4, 4, 5] and tok.decode(ids) == "hello"
    with pytest.raises(ValueError, match="'z' at position 2"):
        tok.encode("hoz")
    tok.save(tmp_path / "meta.json")
    assert CharTokenizer.load(tmp_path / "meta.json").chars == tok.chars
    assert CharTokenizer.from_text("ab\u00e9\u4e2d").decode(CharTokenizer.from_text("ab\u00e9\u4e2d").encode("\u4e2da")) \
        == "\u4e2da"


def test_random_sampling_like_get_batch():
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(1000))
    ds = CharDataset(text, seq_length=8, split="train", num_samples=500, seed=3)
    assert len(ds) == 500 and len(ds.data) == 900
    starts = np.array([ds.start_position(i) for i in range(len(ds))])
    assert starts.min() >= 0 and starts.max() <= 900 - 9
    assert len(np.unique(starts)) > 300                    # with replacement, but spread out
    for i in (0, 7, 499):
        sample = ds[i]
        assert sample.dtype == np.int32 and sample.shape == (9,)
        np.testing.assert_array_equal(sample, ds.data[starts[i]:starts[i] + 9])
    again = CharDataset(text, seq_length=8, num_samples=500, seed=3)
    np.testing.assert_array_equal(ds.get_batch(range(500)), again.get_batch(list(range(500))[::-1])[::-1])
    other = CharDataset(text, seq_length=8, num_samples=500, seed=4)
    assert not np.array_equal(ds.get_batch(range(20)), other.get_batch(range(20)))
    assert len(CharDataset(text, seq_length=8)) == (900 - 1) // 8      # default: one pass worth
    with pytest.raises(IndexError):
        ds[500]


def test_sequential_sampling_and_splits():
    text = "abcdefghij" * 10                                     # 100 chars
    train = CharDataset(text, seq_length=4, sampling="sequential", val_fraction=0.2)
    val = CharDataset(text, seq_length=4, sampling="sequential", val_fraction=0.2, split="val")
    assert len(train.data) == 80 and len(val.data) == 20
    assert len(train) == 19 and len(val) == 4
    np.testing.assert_array_equal(train[1], train.data[4:9])
    np.testing.assert_array_equal(val[3], val.data[12:17])
    full = CharDataset(text, seq_length=4, sampling="sequential", split="all")
    assert len(full.data) == 100


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_length=0), "seq_length"), (dict(seq_length=4, split="test"), "split"),
    (dict(seq_length=4, val_fraction=1.0), "val_fraction"), (dict(seq_length=4, sampling="shuffled"), "sampling"),
    (dict(seq_length=4, num_samples=0), "num_samples"), (dict(seq_length=500), "fewer than seq_length"),
])
def test_char_dataset_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CharDataset("abcdefghij" * 10, **kwargs)


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_order_free():
    ds = SyntheticDataset(vocab_size=50, seq_length=16, num_samples=100, seed=5)
    batch = ds.get_batch(range(100))
    assert batch.shape == (100, 17) and batch.dtype == np.int32
    assert batch.min() >= 0 and batch.max() < 50
    np.testing.assert_array_equal(ds[42], SyntheticDataset(50, 16, 100, seed=5)[42])
    assert not np.array_equal(ds[42], SyntheticDataset(50, 16, 100, seed=6)[42])
    np.testing.assert_array_equal(ds[-1], ds[99])
    with pytest.raises(ValueError, match="vocab_size"):
        SyntheticDataset(0, 16, 100)


# ---------------------------------------------------------------------------------------------
# memory-mapped token dataset
# ---------------------------------------------------------------------------------------------

def _docs(rng, n=40, vocab=1000, max_len=30):
    return [rng.integers(1, vocab, size=rng.integers(0, max_len)) for _ in range(n)]


@pytest.mark.parametrize("dtype,vocab", [("uint16", 60000), ("int32", 100000)])
def test_mmap_round_trip(tmp_path, dtype, vocab):
    rng = np.random.default_rng(0)
    docs = _docs(rng, vocab=vocab)
    prefix = write_indexed_dataset(tmp_path / "sub" / "corpus", docs, vocab_size=vocab)
    assert (tmp_path / "sub" / "corpus.bin").is_file() and (tmp_path / "sub" / "corpus.idx").is_file()
    assert not list((tmp_path / "sub").glob("*.tmp"))
    ds = IndexedDataset(prefix)
    assert ds.dtype == dtype and len(ds) == len(docs)
    assert ds.num_tokens == sum(len(d) for d in docs)
    np.testing.assert_array_equal(ds.sizes, [len(d) for d in docs])
    assert isinstance(ds.tokens, np.memmap) and ds.tokens.dtype == np.dtype(dtype)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], doc)
    np.testing.assert_array_equal(ds.get(3, 1, 2), docs[3][1:3])
    np.testing.assert_array_equal(ds[-1], docs[-1])
    assert b"pickle" not in (tmp_path / "sub" / "corpus.idx").read_bytes()


def test_builder_append_eod_and_errors(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "a", vocab_size=10, append_eod=0) as b:
        b.add_document([5, 6])
        b.add_document([])
        b.add_document(np.array([9], dtype=np.int64))
    ds = IndexedDataset(tmp_path / "a")
    assert [ds[i].tolist() for i in range(3)] == [[5, 6, 0], [0], [9, 0]]
    with pytest.raises(ValueError, match=r"document 1 .*outside \[0, 10\)"):
        write_indexed_dataset(tmp_path / "b", [[1], [3, 10]], vocab_size=10)
    assert not (tmp_path / "b.bin").exists() and not (tmp_path / "b.bin.tmp").exists()
    with pytest.raises(ValueError, match="dtype"):
        IndexedDatasetBuilder(tmp_path / "c", dtype="float32")
    with pytest.raises(ValueError, match="outside"):
        write_indexed_dataset(tmp_path / "d", [[70000]], dtype="uint16")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        IndexedDataset(tmp_path / "nope")
    (tmp_path / "e.bin").write_bytes(b"")
    (tmp_path / "e.idx").write_bytes(b"\x80\x04not an index")
    with pytest.raises(ValueError, match="magic"):
        IndexedDataset(tmp_path / "e")
    write_indexed_dataset(tmp_path / "f", [[1, 2, 3]], dtype="int32")
    with open(tmp_path / "f.bin", "ab") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(ValueError, match="expects 3 tokens"):
        IndexedDataset(tmp_path / "f")
    empty = IndexedDataset(write_indexed_dataset(tmp_path / "g", []))
    assert len(empty) == 0 and empty.num_tokens == 0


# ---------------------------------------------------------------------------------------------
# GPT dataset
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 500, size=rng.integers(1, 25)) for _ in range(30)]
    prefix = write_indexed_dataset(tmp_path / "gpt", docs, vocab_size=500, append_eod=0)
    return IndexedDataset(prefix), docs


def test_gpt_unshuffled_samples_are_consecutive_windows(corpus):
    ds_idx, docs = corpus
    stream = np.concatenate([np.append(d, 0) for d in docs])
    gpt = GPTDataset(ds_idx, seq_length=16, shuffle=False)
    assert len(gpt) == (len(stream) - 1) // 16 and gpt.num_epochs == 1
    for j in range(len(gpt)):
        np.testing.assert_array_equal(gpt[j], stream[j * 16:j * 16 + 17])
    assert gpt[0].dtype == np.int32


def test_gpt_shuffled_is_deterministic_and_spans_epochs(corpus):
    ds_idx, _ = corpus
    n = 3 * (ds_idx.num_tokens // 16)                  # needs about three epochs
    gpt = GPTDataset(ds_idx, seq_length=16, num_samples=n, seed=7)
    assert gpt.num_epochs in (3, 4) and len(gpt) == n
    # every epoch of the document index is a permutation of all documents
    per_epoch = gpt.document_index.reshape(gpt.num_epochs, len(ds_idx))
    for order in per_epoch:
        assert sorted(order.tolist()) == list(range(len(ds_idx)))
    assert not np.array_equal(per_epoch[0], per_epoch[1])
    assert sorted(gpt.shuffle_index.tolist()) == list(range(n))
    # samples are windows of the stream in document-index order, picked by the shuffle index
    stream = np.concatenate([ds_idx[int(d)] for d in gpt.document_index])
    for i in (0, 1, n // 2, n - 1):
        j = int(gpt.shuffle_index[i])
        np.testing.assert_array_equal(gpt[i], stream[j * 16:j * 16 + 17])
    same = GPTDataset(ds_idx, seq_length=16, num_samples=n, seed=7)
    np.testing.assert_array_equal(gpt.get_batch(range(n)), same.get_batch(range(n)))
    other = GPTDataset(ds_idx, seq_length=16, num_samples=n, seed=8)
    assert not np.array_equal(gpt.get_batch(range(10)), other.get_batch(range(10)))


def test_gpt_document_split(corpus):
    ds_idx, docs = corpus
    train_ids, valid_ids, test_ids = split_documents(len(ds_idx), "80,20")
    assert (len(train_ids), len(valid_ids), len(test_ids)) == (24, 6, 0)
    val = GPTDataset(ds_idx, seq_length=8, document_ids=valid_ids, shuffle=False)
    stream = np.concatenate([np.append(docs[i], 0) for i in valid_ids])
    np.testing.assert_array_equal(val[1], stream[8:17])
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    sizes = [len(x) for x in split_documents(1000, "969,30,1")]
    assert sizes == [969, 30, 1]
    with pytest.raises(ValueError, match="split"):
        parse_split("a,b")
    with pytest.raises(ValueError, match="fewer than seq_length"):
        GPTDataset(ds_idx, seq_length=10 ** 6)


# ---------------------------------------------------------------------------------------------
# data-parallel sampler
# ---------------------------------------------------------------------------------------------

def _samplers(dp, **kw):
    return [DataParallelBatchSampler(data_parallel_size=dp, data_parallel_rank=r, **kw) for r in range(dp)]


@pytest.mark.parametrize("shuffle", [False, True])
def test_sampler_ranks_cover_the_global_batch(shuffle):
    kw = dict(num_samples=103, micro_batch_size=2, micro_batch_num=3, shuffle=shuffle, seed=11)
    single = DataParallelBatchSampler(data_parallel_size=1, data_parallel_rank=0, micro_batch_size=2 * 4,
                                      micro_batch_num=3, num_samples=103, shuffle=shuffle, seed=11)
    ranks = _samplers(4, **kw)
    assert ranks[0].global_batch_size == 24 and ranks[0].local_batch_size == 6 and len(ranks[0]) == 4
    seen = []
    for step in range(len(ranks[0])):
        parts = [s.local_batch(step) for s in ranks]
        joined = np.concatenate(parts)
        np.testing.assert_array_equal(joined, ranks[0].global_batch(step))
        np.testing.assert_array_equal(joined, single.global_batch(step))   # same global batch as 1 process
        seen.extend(joined.tolist())
    assert len(seen) == len(set(seen)) == 96            # one epoch: no repeats, 7 dropped
    if not shuffle:
        assert seen == list(range(96))
    assert [m.tolist() for m in ranks[1].micro_batches(ranks[1].local_batch(0))] == \
        [x.tolist() for x in ranks[1].local_batch(0).reshape(3, 2)]


def test_sampler_iteration_epochs_and_shuffle_per_epoch():
    s = DataParallelBatchSampler(10, micro_batch_size=2, data_parallel_size=2, data_parallel_rank=0,
                                 shuffle=True, seed=1)
    t = DataParallelBatchSampler(10, micro_batch_size=2, data_parallel_size=2, data_parallel_rank=1,
                                 shuffle=True, seed=1)
    epoch0 = [np.concatenate([a, b]) for a, b in zip(s, t)]
    assert len(epoch0) == 2 and s.consumed_samples == 8 and s.epoch == 1
    epoch1 = [np.concatenate([a, b]) for a, b in zip(s, t)]
    assert len(epoch1) == 2 and s.epoch == 2
    assert not np.array_equal(np.concatenate(epoch0), np.concatenate(epoch1))
    np.testing.assert_array_equal(s.epoch_order(0), DataParallelBatchSampler(10, 4, shuffle=True, seed=1).epoch_order(0))


def test_sampler_resume_gives_the_same_batches():
    kw = dict(num_samples=50, micro_batch_size=3, micro_batch_num=2, data_parallel_size=2, data_parallel_rank=1,
              shuffle=True, seed=9)
    straight = DataParallelBatchSampler(**kw)
    expected = [b for _ in range(3) for b in straight]       # three epochs
    first = DataParallelBatchSampler(**kw)
    got = []
    for batch in first:
        got.append(batch)
        if len(got) == 3:
            break
    state = first.state_dict()
    assert state["consumed_samples"] == 3 * 12
    resumed = DataParallelBatchSampler(**kw, consumed_samples=state["consumed_samples"])
    while len(got) < len(expected):
        got.extend(resumed)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    again = DataParallelBatchSampler(**kw)
    again.load_state_dict(state)
    np.testing.assert_array_equal(next(iter(again)), expected[3])
    with pytest.raises(ValueError, match="seed"):
        DataParallelBatchSampler(**{**kw, "seed": 10}).load_state_dict(state)
    with pytest.raises(ValueError, match="multiple"):
        DataParallelBatchSampler(**kw, consumed_samples=5)


def test_sampler_without_drop_remainder_wraps():
    s = DataParallelBatchSampler(10, micro_batch_size=2, data_parallel_size=2, drop_remainder=False)
    assert len(s) == 3
    np.testing.assert_array_equal(s.global_batch(2), [8, 9, 0, 1])
    np.testing.assert_array_equal(s.global_batch(3), [0, 1, 2, 3])         # next epoch
    tiny = DataParallelBatchSampler(3, micro_batch_size=4, drop_remainder=False)
    np.testing.assert_array_equal(tiny.global_batch(0), [0, 1, 2, 0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_samples=5, micro_batch_size=4, data_parallel_size=2), "smaller than one global batch"),
    (dict(num_samples=5, micro_batch_size=0), "micro_batch_size"),
    (dict(num_samples=50, micro_batch_size=1, data_parallel_size=2, data_parallel_rank=2), "data_parallel_rank"),
])
def test_sampler_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataParallelBatchSampler(**kwargs)


# ---------------------------------------------------------------------------------------------
# model inputs
# ---------------------------------------------------------------------------------------------

def test_model_inputs_plain():
    samples = np.arange(10).reshape(2, 5)
    out = build_model_inputs(samples)
    np.testing.assert_array_equal(out["tokens"], [[0, 1, 2, 3], [5, 6, 7, 8]])
    np.testing.assert_array_equal(out["labels"], [[1, 2, 3, 4], [6, 7, 8, 9]])
    assert out["tokens"].dtype == np.int32 and out["loss_mask"].dtype == np.float32
    assert (out["loss_mask"] == 1).all()
    np.testing.assert_array_equal(out["position_ids"], [[0, 1, 2, 3]] * 2)
    mask = out["attention_mask"]
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == bool
    np.testing.assert_array_equal(mask[0, 0], np.triu(np.ones((4, 4), bool), k=1))   # True = masked


def test_model_inputs_with_eod():
    eod = 0
    tokens = np.array([[5, 0, 6, 7, 0, 8], [1, 2, 3, 4, 5, 6]])
    att, loss_mask, pos = get_ltor_masks_and_position_ids(tokens, eod, reset_position_ids=True,
                                                          reset_attention_mask=True, eod_mask_loss=True)
    np.testing.assert_array_equal(pos, [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(loss_mask, [[1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1]])
    assert att.shape == (2, 1, 6, 6)
    allowed = ~att[0, 0]
    expected = np.zeros((6, 6), bool)
    for q, k in [(0, 0), (1, 0), (1, 1), (2, 2), (3, 2), (3, 3), (4, 2), (4, 3), (4, 4), (5, 5)]:
        expected[q, k] = True
    np.testing.assert_array_equal(allowed, expected)
    np.testing.assert_array_equal(att[1, 0], np.triu(np.ones((6, 6), bool), k=1))
    # Megatron's loop formulation gives the same masks
    ref = np.tril(np.ones((6, 6), bool))
    for i in np.nonzero(tokens[0] == eod)[0]:
        ref[i + 1:, :i + 1] = False
    np.testing.assert_array_equal(allowed, ref)
    # no reset: causal mask, positions 0..s-1; only the loss mask uses eod
    att2, lm2, pos2 = get_ltor_masks_and_position_ids(tokens, eod, eod_mask_loss=True, build_attention_mask=False)
    assert att2 is None and (pos2 == np.arange(6)).all() and lm2[0, 1] == 0
    with pytest.raises(ValueError, match="eod_token"):
        get_ltor_masks_and_position_ids(tokens, None, reset_position_ids=True)


def test_collate_with_sampler_and_dataset():
    ds = SyntheticDataset(100, 8, 40, seed=0)
    sampler = DataParallelBatchSampler(len(ds), micro_batch_size=4, micro_batch_num=2)
    batch = collate(ds, next(iter(sampler)))
    assert batch.shape == (8, 9) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch[3], ds[3])
