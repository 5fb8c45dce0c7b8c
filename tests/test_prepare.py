"""`qtrain prepare`: token shards that do not depend on the worker count, survive a kill, mix sources, and hold
out whole documents or a separate validation source; with sentencepiece, tokenizer.json and HF tokenizers."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from qtrain.config.recipe import DataConfig
from qtrain.data.dataset import prepare_data
from qtrain.data.prepare import tokenize_source
from qtrain.data.shards import INDEX_FILE, ShardSet
from qtrain.data.sources import DocumentStream, iter_documents, resolve_source
from qtrain.data.tokenizer import load_tokenizer, train_tokenizer
from qtrain.errors import DataError

REPO = Path(__file__).resolve().parent.parent
CHARS = 120_000


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def docs(cache):
    """About 120k characters of real documents (the embedded corpus's start)."""
    return list(iter_documents("default", cache, CHARS))


@pytest.fixture(scope="module")
def spm_path(docs, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t.model"
    train_tokenizer(docs, 512, path)
    return path


def write_jsonl(path: Path, docs) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def packed(tok, docs) -> np.ndarray:
    return np.concatenate([np.asarray(tok.encode(d) + [tok.eos_id()]) for d in docs])


def shards_of(path: Path) -> tuple[np.ndarray, np.ndarray, list]:
    s = ShardSet(path)
    cat = lambda parts: np.concatenate([np.asarray(p) for p in parts]) if parts else np.empty(0)
    return cat(s.train), cat(s.val), [(x["train_tokens"], x["val_tokens"]) for x in s.index["shards"]]


# --- the pipeline ----------------------------------------------------------------------------------------


def test_token_stream_is_the_same_whatever_the_number_of_workers(docs, spm_path, tmp_path):
    source = resolve_source(str(write_jsonl(tmp_path / "c.jsonl", docs)), tmp_path)
    tok = load_tokenizer(spm_path)
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        done = tokenize_source(source, tok, spm_path, out, np.dtype(np.uint16), val_fraction=0.1, workers=workers,
                               unit_chars=4000, shard_tokens=6000, progress=False)
        assert done["workers"] == workers
        runs[workers] = shards_of(out)
    (train1, val1, layout1), (train2, val2, layout2) = runs[1], runs[2]
    assert len(layout1) > 3 and layout1 == layout2  # several shards, cut at the same places
    np.testing.assert_array_equal(train1, train2)
    np.testing.assert_array_equal(val1, val2)
    held = [d.val for d in DocumentStream(source, val_fraction=0.1)]
    np.testing.assert_array_equal(train1, packed(tok, [d for d, h in zip(docs, held) if not h]))
    np.testing.assert_array_equal(val1, packed(tok, [d for d, h in zip(docs, held) if h]))


KILLED_PREPARE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    import qtrain.data.prepare as prep
    from qtrain.data.sources import resolve_source
    from qtrain.data.tokenizer import load_tokenizer

    real = prep.encode_docs
    def slow(*args, **kwargs):  # slowed down so that the test can kill it in the middle
        time.sleep(0.05)
        return real(*args, **kwargs)
    prep.encode_docs = slow
    corpus, tok, out = sys.argv[1:4]
    prep.tokenize_source(resolve_source(corpus, Path(out).parent), load_tokenizer(tok), Path(tok), Path(out),
                         np.dtype(np.uint16), val_fraction=0.1, workers=1, unit_chars=2000, shard_tokens=3000,
                         progress=False)
""")


def test_a_killed_prepare_resumes_from_its_last_complete_shard(docs, spm_path, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    source = resolve_source(str(corpus), tmp_path)
    tok = load_tokenizer(spm_path)
    straight = tmp_path / "straight"
    tokenize_source(source, tok, spm_path, straight, np.dtype(np.uint16), val_fraction=0.1, unit_chars=2000,
                    shard_tokens=3000, progress=False)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PREPARE, str(corpus), str(spm_path), str(killed)],
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 120
    index = killed / INDEX_FILE
    while not (index.is_file() and len(json.loads(index.read_text())["shards"]) >= 2):
        assert proc.poll() is None and time.time() < deadline, "prepare ended before its second shard"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = json.loads(index.read_text())
    assert not before["complete"]
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in killed.glob("train-*.bin")}
    done = tokenize_source(source, tok, spm_path, killed, np.dtype(np.uint16), val_fraction=0.1, unit_chars=2000,
                           shard_tokens=3000, progress=False)
    assert done["resumed_from"] == before["shards"][-1]["end"]
    for name, stamp in kept.items():  # the complete shards were not written again
        p = killed / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp
    assert not list(killed.glob("*.partial"))
    a, b = shards_of(straight), shards_of(killed)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]


# --- what prepare_data builds --------------------------------------------------------------------------


def test_mixture_weights_decide_where_windows_come_from(docs, spm_path, tmp_path, cache):
    a = write_jsonl(tmp_path / "a.jsonl", docs[: len(docs) // 2])
    b = write_jsonl(tmp_path / "b.jsonl", docs[len(docs) // 2:])
    cfg = DataConfig(sources={str(a): 3.0, str(b): 1.0}, tokenizer=str(spm_path), cache_dir=str(cache))
    ds = prepare_data(cfg, 512, 32, progress=False)
    n_a = len(ds.train_streams[0])
    sampler = ds.sampler(64, 32, seed=0)
    starts = np.concatenate([sampler.offsets(k) for k in range(50)])
    assert abs((starts < n_a).mean() - 0.75) < 0.03  # 3 : 1, whatever the sizes of the sources
    x, _ = sampler.batch_at(7)
    np.testing.assert_array_equal(x.numpy(), np.stack([ds.train.take(int(s), 32) for s in sampler.offsets(7)]))
    assert (starts < n_a).all() or (starts[starts >= n_a] - n_a <= len(ds.train_streams[1]) - 33).all()
    windows = [w for w, _ in ds.val_batches(8, 4, 32)]
    assert sum(len(w) for w in windows) == 32  # shared among the sources' validation documents by weight
    other = prepare_data(DataConfig(sources={str(a): 1.0, str(b): 1.0}, tokenizer=str(spm_path), cache_dir=str(cache)),
                         512, 32, progress=False)
    assert other.identity()["corpus"] != ds.identity()["corpus"]  # other weights: another data stream
    assert other.shard_dirs == ds.shard_dirs  # ... from the same shards
    with pytest.raises(DataError, match=r'\[data.sources\] ".*a.jsonl": the training split holds \d+ tokens'):
        prepare_data(DataConfig(sources={str(a): 1.0, str(b): 1.0}, tokenizer=str(spm_path), cache_dir=str(cache)),
                     512, 20_000, progress=False)


def test_a_separate_validation_source_c4_style(docs, spm_path, tmp_path, cache):
    (tmp_path / "c4").mkdir()
    for i in range(3):
        write_jsonl(tmp_path / "c4" / f"c4-train.{i:05d}-of-00003.json", docs[i * 6:(i + 1) * 6])
    write_jsonl(tmp_path / "c4" / "c4-validation.00000-of-00001.json", docs[18:24])
    cfg = DataConfig(corpus=str(tmp_path / "c4" / "c4-train.*.json"), validation=str(tmp_path / "c4" / "c4-validation.*"),
                     tokenizer=str(spm_path), cache_dir=str(cache))
    ds = prepare_data(cfg, 512, 32, progress=False)
    tok = ds.tokenizer
    np.testing.assert_array_equal(ds.train[:], packed(tok, docs[:18]))  # nothing held out of the training files
    np.testing.assert_array_equal(ds.val[:], packed(tok, docs[18:24]))


def test_tokenizer_is_trained_on_a_sample_without_validation_documents(tmp_path, cache, monkeypatch):
    import qtrain.data.dataset

    marker = "zqxjvalidationonlyzqxj"
    docs = [f"plain training text number {i}, with some words in it." for i in range(200)]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    src = resolve_source(str(corpus), tmp_path)
    held = [d.val for d in DocumentStream(src, val_fraction=0.1)]
    docs = [d + (" " + marker) * 20 if h else d for d, h in zip(docs, held)]
    write_jsonl(corpus, docs)
    seen = []
    real = qtrain.data.dataset.train_tokenizer

    def spy(documents, *args, **kwargs):
        documents = list(documents)
        seen.extend(documents)
        return real(documents, *args, **kwargs)

    monkeypatch.setattr(qtrain.data.dataset, "train_tokenizer", spy)
    ds = prepare_data(DataConfig(corpus=str(corpus), val_fraction=0.1, cache_dir=str(cache)), 300, 16, progress=False)
    assert seen and not any(marker in d for d in seen)
    assert len(seen) == len(docs) - sum(held)
    assert marker in ds.tokenizer.decode(ds.val[:].tolist())


def _hf_tokenizer(docs, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    path = tmp_path / "bare" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", unk_token="<unk>").save_pretrained(
        str(tmp_path / "hfdir"))
    return path, tmp_path / "hfdir"


@pytest.mark.parametrize("kind", ["tokenizer.json", "hf directory"])
def test_hugging_face_tokenizers_prepare_in_parallel_and_travel_with_the_run(docs, tmp_path, cache, kind, monkeypatch):
    import qtrain.data.prepare

    monkeypatch.setattr(qtrain.data.prepare, "UNIT_CHARS", 20_000)  # several units: two worker processes
    bare, directory = _hf_tokenizer(docs, tmp_path)
    given = bare if kind == "tokenizer.json" else directory
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    tok = load_tokenizer(given)
    assert tok.eos_id() == 2 and tok.get_piece_size() == 400
    ds = prepare_data(DataConfig(corpus=str(corpus), tokenizer=str(given), cache_dir=str(cache),
                                 prepare_workers=2), 400, 32, tmp_path / "run", progress=False)
    held = [d.val for d in DocumentStream(resolve_source(str(corpus), tmp_path), val_fraction=0.05)]
    np.testing.assert_array_equal(ds.val[:], packed(tok, [d for d, h in zip(docs, held) if h]))
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    assert load_tokenizer(tmp_path / "run" / "tokenizer").encode(docs[0]) == tok.encode(docs[0])


def test_prepare_command_reports_the_shards(tmp_path, cache, docs, capsys):
    from qtrain.cli.main import main as cli

    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    args = ["prepare", "--quiet", "--set", f"data.corpus={corpus}", "--set", "model.vocab_size=512",
            "--set", f"data.cache_dir={cache}", "--set", "train.seq_len=64"]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "training tokens" in out and "shards:" in out and "epochs of the training tokens" in out
    assert cli(args) == 0  # a second prepare finds everything done
    assert "prepared" not in capsys.readouterr().err
