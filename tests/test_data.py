"""Corpus readers, tokenizer, token shards, sampler and validation windows (all on tiny data)."""

import gzip
import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import torch

import qtrain.data.dataset
import qtrain.data.sources
from qtrain.config.recipe import DataConfig
from qtrain.data.dataset import TokenSampler, prepare_data, val_batches
from qtrain.data.readers import DataError, UndecodableBytesWarning, default_corpus_path
from qtrain.data.shards import ShardSet
from qtrain.data.sources import file_phase, held_out, iter_documents
from qtrain.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, check_vocab, load_tokenizer, train_tokenizer

SMALL_CHARS = 150_000  # a prefix of the default corpus: sentencepiece trains 512 pieces on it in ~0.1 s
VOCAB = 512


@pytest.fixture(scope="session")
def default_corpus_file(tmp_path_factory):
    """The default corpus, extracted once per session (each extraction starts an interpreter)."""
    return default_corpus_path(tmp_path_factory.mktemp("session-cache"))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch, default_corpus_file):
    """A fresh cache dir per test (via QTRAIN_CACHE), pre-seeded with the extracted default corpus."""
    root = tmp_path / "cache"
    (root / "corpus").mkdir(parents=True)
    shutil.copy(default_corpus_file, root / "corpus" / default_corpus_file.name)
    monkeypatch.setenv("QTRAIN_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    """A 512-piece tokenizer trained on the first SMALL_CHARS characters of the default corpus."""
    root = tmp_path_factory.mktemp("tok")
    path = root / "small.model"
    train_tokenizer(iter_documents("default", root / "cache", SMALL_CHARS), VOCAB, path)
    return path


# --- default corpus -----------------------------------------------------------------------------------


def test_default_corpus_is_large_and_deterministic(cache, tmp_path):
    # two independent extractions (the session's and this one, each in a fresh interpreter): same bytes
    path, other = default_corpus_path(cache), default_corpus_path(tmp_path / "other")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(other.read_bytes()).hexdigest()
    docs = list(iter_documents("default", cache))
    assert sum(len(d.encode()) for d in docs) > 1_000_000
    assert len(docs) > 300 and all(d == d.strip() for d in docs)
    # extracted once, then read from the cache
    mtime = path.stat().st_mtime_ns
    assert default_corpus_path(cache).stat().st_mtime_ns == mtime


def test_max_corpus_chars_truncates_exactly(cache):
    docs = list(iter_documents("default", cache, 10_000))
    assert sum(len(d) for d in docs) == 10_000


# --- user corpora -------------------------------------------------------------------------------------


def test_text_file_is_one_document(tmp_path, cache):
    p = tmp_path / "a.txt"
    p.write_text("  first paragraph\n\nsecond paragraph\n\n")
    assert list(iter_documents(str(p), cache)) == ["first paragraph\n\nsecond paragraph"]


def test_directory_reads_txt_and_md_recursively_sorted(tmp_path, cache):
    d = tmp_path / "corpus"
    (d / "b").mkdir(parents=True)
    (d / "b" / "z.md").write_text("zed")
    (d / "b" / "a.txt").write_text("ay")
    (d / "c.txt").write_text("see")
    (d / "skip.json").write_text("{}")  # a plain .json in a directory is not JSON lines (dataset_info.json ...)
    (d / "empty.txt").write_text("\n \n")  # empty documents are dropped
    assert list(iter_documents(str(d), cache)) == ["ay", "zed", "see"]


def test_jsonl_plain_and_gz(tmp_path, cache):
    lines = [json.dumps({"text": "one", "id": 1}), "", json.dumps({"text": "two\nlines"})]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    assert list(iter_documents(str(tmp_path / "c.jsonl"), cache)) == ["one", "two\nlines"]
    assert list(iter_documents(str(tmp_path / "c.jsonl.gz"), cache)) == ["one", "two\nlines"]


def test_jsonl_errors_name_file_and_line(tmp_path, cache):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(DataError, match=r'bad.jsonl:2: no string "text" field; each line must look like'):
        list(iter_documents(str(p), cache))
    p.write_text('{"text": "ok"}\n\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: invalid JSON"):
        list(iter_documents(str(p), cache))


def test_non_utf8_bytes_are_skipped_with_a_warning(tmp_path, cache):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\u00e9 ".encode() + b"na\xefve \xff\xfe end")  # 3 bytes that are not UTF-8
    with pytest.warns(UndecodableBytesWarning, match=r"latin1.txt: skipped 3 undecodable bytes \(not UTF-8\)"):
        docs = list(iter_documents(str(p), cache))
    assert docs == ["caf\u00e9 nave  end"]


def test_missing_and_empty_corpora(tmp_path, cache):
    with pytest.raises(DataError, match=r'\[data\] corpus = ".*nope.txt": no such file or directory'):
        list(iter_documents(str(tmp_path / "nope.txt"), cache))
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    with pytest.raises(DataError, match=r"contains no text \(empty after stripping whitespace\)"):
        list(iter_documents(str(tmp_path / "blank.txt"), cache))
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="the directory has no .txt or .md files"):
        list(iter_documents(str(tmp_path / "d"), cache))


# --- tokenizer ----------------------------------------------------------------------------------------


def test_tokenizer_special_ids_and_lossless_round_trip(small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    assert tok.get_piece_size() == VOCAB
    assert (tok.unk_id(), tok.bos_id(), tok.eos_id(), tok.pad_id()) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID) == (0, 1, 2, 3)
    text = "def f(x):\n    return x  # \u00e9\u4e2d 2024\n"  # newline, indentation, unseen characters, digits
    ids = tok.encode(text)
    assert UNK_ID not in ids  # byte fallback: nothing is unknown
    assert tok.decode(ids) == text


def test_tokenizer_training_is_deterministic(tmp_path, small_tokenizer, cache):
    train_tokenizer(iter_documents("default", cache, SMALL_CHARS), VOCAB, tmp_path / "again.model")
    assert (tmp_path / "again.model").read_bytes() == small_tokenizer.read_bytes()


def test_vocab_too_large_or_too_small_for_corpus(tmp_path):
    docs = ["hello world, this is a tiny corpus"] * 20
    with pytest.raises(DataError, match=r"too small for \[model\] vocab_size = 5000: sentencepiece can build at "
                                        r"most \d+ pieces from it; lower model.vocab_size to <= \d+"):
        train_tokenizer(docs, 5000, tmp_path / "t.model")
    with pytest.raises(DataError, match=r"\[model\] vocab_size = 100 is too small: this corpus needs \d+ pieces"):
        train_tokenizer(docs, 100, tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()


def test_check_vocab_names_both_sizes_and_keys(small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    check_vocab(tok, 512)
    msg = ("the tokenizer ([data] tokenizer) has 512 pieces but [model] vocab_size = 2048; "
           "set model.vocab_size = 512, or use a tokenizer with 2048 pieces")
    with pytest.raises(DataError, match=re.escape(msg)):
        check_vocab(tok, 2048)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match=r'\[data\] tokenizer = ".*missing.model": no such file'):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="is not a sentencepiece model"):
        load_tokenizer(tmp_path / "junk.model")


# --- prepare_data -------------------------------------------------------------------------------------


def _packed(tokenizer, docs):
    return np.concatenate([np.asarray(tokenizer.encode(d) + [EOS_ID]) for d in docs])


def test_prepare_data_holds_out_whole_documents_and_fills_the_run_dir(tmp_path, cache):
    cfg = DataConfig(max_corpus_chars=SMALL_CHARS, val_fraction=0.1)
    ds = prepare_data(cfg, VOCAB, 64, run_dir=tmp_path / "run")
    docs = list(iter_documents("default", cache, SMALL_CHARS))
    held = [held_out(j, file_phase(0), 0.1) for j in range(len(docs))]
    assert sum(held) in (len(docs) // 10, len(docs) // 10 + 1)  # one document in ten, never a cut through one
    # each split is its documents packed with one EOS after each, in corpus order
    np.testing.assert_array_equal(ds.train[:], _packed(ds.tokenizer, [d for d, h in zip(docs, held) if not h]))
    np.testing.assert_array_equal(ds.val[:], _packed(ds.tokenizer, [d for d, h in zip(docs, held) if h]))
    assert ds.train.dtype == np.uint16 and (ds.token_path / "train-00000.bin").is_file()
    shards = ShardSet(ds.token_path)  # the index: where every document ends
    ends = shards.doc_ends("val")
    assert len(ends) == sum(held) and ends[-1] == len(ds.val) and (ds.val[:][ends - 1] == EOS_ID).all()
    # evaluation windows: non-overlapping, spread from the first token to near the last
    tiles = (len(ds.val) - 1) // 64
    (x, y), = ds.val_batches(1, 2, 64)
    torch.testing.assert_close(x[1], torch.from_numpy(ds.val[(tiles // 2) * 64 : (tiles // 2 + 1) * 64]), rtol=0, atol=0)
    torch.testing.assert_close(y[:, :-1], x[:, 1:], rtol=0, atol=0)
    x, y = ds.sampler(batch_size=3, seq_len=64, seed=0).next_batch()
    assert x.shape == (3, 64) and int(x.max()) < VOCAB
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == ds.tokenizer_path.read_bytes()
    record = json.loads((tmp_path / "run" / "data.json").read_text())
    assert record["identity"] == ds.identity() and record["sources"][0]["shards"] == str(ds.token_path)
    assert not list(cache.rglob(".tmp-*")) and not list(cache.rglob("*.partial"))  # atomic writes only


def test_eval_tokens_sets_the_evaluation_size(cache):
    ds = prepare_data(DataConfig(max_corpus_chars=SMALL_CHARS, eval_tokens=64 * 5), VOCAB, 64)
    assert [x.shape[0] for x, _ in ds.val_batches(100, 2, 64)] == [2, 2, 1]  # 5 windows, whatever eval_batches


def test_a_second_start_reads_no_corpus_and_trains_nothing(cache, monkeypatch):
    cfg = DataConfig(max_corpus_chars=SMALL_CHARS)
    first = prepare_data(cfg, VOCAB, 64)
    stamps = (first.tokenizer_path.stat().st_mtime_ns, (first.token_path / "index.json").stat().st_mtime_ns)

    def forbidden(*args, **kwargs):
        raise AssertionError("the corpus was read, or the tokenizer retrained, despite the cache")

    monkeypatch.setattr(qtrain.data.dataset, "train_tokenizer", forbidden)
    monkeypatch.setattr(qtrain.data.dataset, "tokenize_source", forbidden)
    monkeypatch.setattr(qtrain.data.sources, "read_file", forbidden)
    second = prepare_data(cfg, VOCAB, 64)
    assert (second.tokenizer_path, second.token_path) == (first.tokenizer_path, first.token_path)
    assert (second.tokenizer_path.stat().st_mtime_ns, (second.token_path / "index.json").stat().st_mtime_ns) == stamps
    assert second.identity() == first.identity()
    # a different corpus (another truncation) is a different cache entry
    with pytest.raises(AssertionError, match="despite the cache"):
        prepare_data(DataConfig(max_corpus_chars=SMALL_CHARS - 1), VOCAB, 64)


def test_prepare_data_with_given_tokenizer_checks_vocab(small_tokenizer, tmp_path):
    cfg = DataConfig(max_corpus_chars=SMALL_CHARS, tokenizer=str(small_tokenizer))
    ds = prepare_data(cfg, VOCAB, 64)
    assert ds.tokenizer_path == small_tokenizer
    with pytest.raises(DataError, match=r"has 512 pieces but \[model\] vocab_size = 1024"):
        prepare_data(cfg, 1024, 64)


def test_corpus_shorter_than_one_sequence(small_tokenizer, tmp_path):
    text = "A short corpus. " * 40
    (tmp_path / "short.txt").write_text(text)
    cfg = DataConfig(corpus=str(tmp_path / "short.txt"), tokenizer=str(small_tokenizer))
    # one file, one document: too few to hold out whole ones, so validation is the tail of its tokens
    ds = prepare_data(cfg, VOCAB, 128)
    total = ds.num_train_tokens + ds.num_val_tokens
    assert ds.num_val_tokens == 129 and ds.stats["train"][0]["val_tail"]  # max(5 % of the tokens, one window)
    assert np.array_equal(ds.val[:], np.asarray(ShardSet(ds.token_path).train[0][total - 129 :], dtype=np.int64))
    (tmp_path / "short.txt").write_text("\n\n".join(["A short paragraph."] * 15))
    cfg = DataConfig(corpus=str(tmp_path / "short.txt"), tokenizer=str(small_tokenizer), split_blank_lines=1)
    with pytest.raises(DataError, match=r"the training split holds \d+ tokens \(15 documents, the last 129 tokens "
                                        r"held out for validation\) but needs at least seq_len\+1 = 129"):
        prepare_data(cfg, VOCAB, 128)


# --- sampler and validation windows -------------------------------------------------------------------


def test_sampler_windows_are_shifted_slices():
    tokens = np.arange(1000, dtype=np.uint16)  # token i has value i, so x reveals its offsets
    x, y = TokenSampler(tokens, 4, 16, seed=0).next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
    torch.testing.assert_close(y[:, :-1], x[:, 1:], rtol=0, atol=0)
    starts = x[:, 0]
    torch.testing.assert_close(x, starts[:, None] + torch.arange(16), rtol=0, atol=0)
    torch.testing.assert_close(y, starts[:, None] + torch.arange(1, 17), rtol=0, atol=0)


def test_sampler_same_seed_same_batches_and_offsets_cover_the_range():
    tokens = np.arange(40, dtype=np.uint16)
    a, b, c = (TokenSampler(tokens, 8, 8, seed=s) for s in (3, 3, 4))
    for _ in range(5):
        xa, _ = a.next_batch()
        xb, _ = b.next_batch()
        xc, _ = c.next_batch()
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
    assert not torch.equal(xa, xc)
    starts = np.concatenate([a.offsets(k) for k in range(200)])
    assert starts.min() == 0 and starts.max() == 40 - 8 - 1  # every start that leaves room for the target


def test_sampler_resume_from_state_dict_is_exact():
    tokens = np.arange(5000, dtype=np.uint32)
    s = TokenSampler(tokens, 4, 32, seed=7)
    for _ in range(3):
        s.next_batch()
    state = s.state_dict()
    assert state == {"seed": 7, "batches_drawn": 3, "batch_size": 4, "seq_len": 32, "num_tokens": 5000}
    continuation = [s.next_batch() for _ in range(2)]
    resumed = TokenSampler(tokens, 4, 32, seed=7)
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(continuation, [resumed.next_batch() for _ in range(2)]):
        torch.testing.assert_close(x1, x2, rtol=0, atol=0)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    with pytest.raises(DataError, match=r"saved with batch_size = 4 but this run has 8; resume with the same "
                                        r"train.batch_size"):
        TokenSampler(tokens, 8, 32, seed=7).load_state_dict(state)


def test_val_batches_are_fixed_non_overlapping_windows_spread_over_the_split():
    tokens = np.arange(100, dtype=np.uint16)
    batches = list(val_batches(tokens, n_batches=5, batch_size=2, seq_len=10))
    # (100 - 1) // 10 = 9 windows fit: batches of 2, 2, 2, 2, 1
    assert [x.shape[0] for x, _ in batches] == [2, 2, 2, 2, 1]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    torch.testing.assert_close(x[:, 0], torch.arange(0, 90, 10), rtol=0, atol=0)
    torch.testing.assert_close(y, x + 1, rtol=0, atol=0)
    again = torch.cat([b[0] for b in val_batches(tokens, 5, 2, 10)])
    torch.testing.assert_close(x, again, rtol=0, atol=0)
    assert len(list(val_batches(tokens, n_batches=2, batch_size=3, seq_len=10))) == 2
    # fewer windows than fit: evenly spaced tiles from the start to near the end, never overlapping
    x, _ = next(val_batches(tokens, n_batches=1, batch_size=3, seq_len=10))
    torch.testing.assert_close(x[:, 0], torch.tensor([0, 30, 60]), rtol=0, atol=0)
