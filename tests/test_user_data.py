"""A user's own data through the `qtrain` command: one text file, a moved run directory, resume on changed data,
and bad inputs (damaged archives, a full disk, mixed directories, ambiguous records)."""

import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from qtrain.cli.main import main as cli

# a small model and short windows keep every run here to a few seconds; the [data] keys stay at their defaults
SMALL = ["model.vocab_size=320", "train.sample_tokens=0", "train.eval_batches=2", "train.batch_size=4",
         "train.seq_len=64", "model.max_seq_len=64", "train.steps=2", "train.log_every=1"]
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will what out more up said "
         "river garden window morning letter silence harbour lantern orchard").split()


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def prose(n_chars: int, paragraph_words=(20, 80), seed: int = 0, blank_lines: bool = True) -> str:
    """Sentences of common words in paragraphs, with a blank line between paragraphs (or none)."""
    rng = random.Random(seed)
    paragraphs, size = [], 0
    while size < n_chars:
        words = [rng.choice(WORDS) for _ in range(rng.randint(*paragraph_words))]
        text = " ".join(words).capitalize() + "."
        paragraphs.append(text)
        size += len(text) + 2
    return ("\n\n" if blank_lines else "\n").join(paragraphs) + "\n"


def train_cli(corpus: Path, out: Path, *extra: str) -> int:
    return cli(["train", "tiny", "--quiet", "--out", str(out), "--set", f"data.corpus={corpus}",
                *[f"--set={o}" for o in SMALL + list(extra)]])


def error_of(capsys, *argv) -> str:
    assert cli(list(argv)) == 2
    return capsys.readouterr().err


# --- one plain text file ---------------------------------------------------------------------------------


def test_a_book_in_one_text_file_trains_with_the_defaults_holding_out_whole_paragraphs(tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text(prose(120_000))
    run = tmp_path / "run"
    assert train_cli(book, run) == 0
    record = json.loads((run / "data.json").read_text())
    assert record["sources"][0]["val_tail"] == 0  # paragraphs are documents: whole ones are held out
    shards = record["sources"][0]["shards"]
    index = json.loads((Path(shards) / "index.json").read_text())
    paragraphs = book.read_text().count("\n\n") + 1
    docs = sum(s["train_docs"] + s["val_docs"] for s in index["shards"])
    val_docs = sum(s["val_docs"] for s in index["shards"])
    assert docs == paragraphs and val_docs == pytest.approx(0.05 * paragraphs, abs=1)


def test_one_document_validates_on_the_tail_of_its_tokens_and_the_header_says_so(tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text(prose(60_000, blank_lines=False))  # no blank line: one document
    run = tmp_path / "run"
    assert cli(["train", "tiny", "--out", str(run), "--set", f"data.corpus={book}",
                *[f"--set={o}" for o in SMALL]]) == 0
    out = capsys.readouterr().out
    record = json.loads((run / "data.json").read_text())
    index = json.loads((Path(record["sources"][0]["shards"]) / "index.json").read_text())
    total = sum(s["train_tokens"] for s in index["shards"])
    assert sum(s["val_tokens"] for s in index["shards"]) == 0  # tokenized whole
    held = max(math.ceil(0.05 * total), 65)
    assert record["sources"][0]["val_tail"] == held
    assert f"data: {book}: {total - held:,} training tokens, {held:,} validation tokens" in out
    assert f"validation: the last {held:,} tokens of {book}" in out and "too few to hold out whole ones" in out
    # the tokenizer sample stopped before the tail: the last paragraph's words were never seen ... but the
    # validation windows are the last `held` tokens of the stream
    from qtrain.data.shards import ShardSet

    tokens = np.concatenate(ShardSet(Path(record["sources"][0]["shards"])).train)
    windows = np.load(run / "eval_windows.npz")["x"]
    assert np.array_equal(windows[0], tokens[total - held : total - held + 64])


def test_a_corpus_too_small_is_refused_before_the_tokenizer_is_trained(tmp_path, capsys, cache_dir, monkeypatch):
    from qtrain.data import dataset

    def never(*a, **k):
        raise AssertionError("the tokenizer was trained")

    monkeypatch.setattr(dataset, "train_tokenizer", never)
    short = tmp_path / "short.txt"
    short.write_text("The quick brown fox jumps over the lazy dog.\n")
    err = error_of(capsys, "train", "tiny", "--out", str(tmp_path / "run"), "--set", f"data.corpus={short}",
                   *[f"--set={o}" for o in SMALL])
    assert f'[data] corpus = "{short}" holds 44 characters' in err and "2 x (seq_len+1) = 130" in err
    assert not (cache_dir / "tokenizers").exists() and not (cache_dir / "shards").exists()


# --- a run directory on another machine ------------------------------------------------------------------


def test_eval_works_from_the_run_directory_alone(tmp_path, capsys, cache_dir):
    book = tmp_path / "book.txt"
    book.write_text(prose(80_000))
    run = tmp_path / "run"
    assert train_cli(book, run) == 0
    capsys.readouterr()
    assert cli(["eval", str(run)]) == 0
    before = capsys.readouterr().out
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_val = [r["val_loss"] for r in logged if "val_loss" in r][-1]
    assert f"val loss {last_val:.4f}" in before  # the batches the training evaluations used
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, moved)
    shutil.rmtree(cache_dir)  # no shards, no tokenizer cache ...
    book.unlink()  # ... and no corpus
    assert cli(["eval", str(moved)]) == 0
    assert capsys.readouterr().out == before
    # another number of batches needs the shards or the corpus: the message says what is missing where
    err = error_of(capsys, "eval", str(moved), "--batches", "3")
    assert f"{moved} cannot be evaluated" in err and "eval_windows.npz holds the batches of another setting" in err
    assert "data.json are gone" in err and f'[data] corpus = "{book}": no such file' in err


# --- resume on changed data ------------------------------------------------------------------------------


def test_a_resume_on_a_changed_corpus_is_refused_before_tokenizing_and_leaves_the_run_as_it_was(tmp_path, capsys,
                                                                                               monkeypatch):
    book = tmp_path / "book.txt"
    book.write_text(prose(60_000))
    run = tmp_path / "run"
    assert train_cli(book, run) == 0
    kept = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    book.write_text(prose(60_000, seed=1))
    from qtrain.data import dataset

    def never(*a, **k):
        raise AssertionError("the corpus was prepared again")

    monkeypatch.setattr(dataset, "tokenize_source", never)
    monkeypatch.setattr(dataset, "train_tokenizer", never)
    err = error_of(capsys, "train", "tiny", "--resume", "--out", str(run), "--set", f"data.corpus={book}",
                   *[f"--set={o}" for o in SMALL], "--set", "train.steps=4", "--set", "optim.lr=0.02")
    assert "cannot resume" in err and "the corpus (sha256" in err and "changed since it was saved" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"} == kept


def test_a_resume_refused_for_another_tokenizer_leaves_recipe_and_tokenizer_as_they_were(tmp_path, capsys):
    book, other_book = tmp_path / "book.txt", tmp_path / "other.txt"
    book.write_text(prose(60_000))
    other_book.write_text(prose(60_000, seed=2))
    run, other = tmp_path / "run", tmp_path / "other"
    assert train_cli(book, run) == 0
    assert train_cli(other_book, other) == 0  # a tokenizer of the same size, trained on other text
    kept = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    err = error_of(capsys, "train", "tiny", "--resume", "--out", str(run), "--set", f"data.corpus={book}",
                   *[f"--set={o}" for o in SMALL], "--set", f"data.tokenizer={other / 'tokenizer.model'}",
                   "--set", "train.steps=4")
    assert "cannot resume" in err and "the tokenizer (sha256" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"} == kept


# --- damaged archives, a full disk, the tokenizer's data errors --------------------------------------------


def records(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))}) + "\n"
            for _ in range(n)]


def write_gz(path: Path, lines: list[str]) -> Path:
    import gzip

    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(lines)
    return path


def prepare_cli(corpus: Path, *extra: str) -> list[str]:
    return ["prepare", "tiny", "--quiet", "--workers", "1", "--set", f"data.corpus={corpus}",
            *[f"--set={o}" for o in SMALL + list(extra)]]


@pytest.mark.parametrize("damage", ["crc", "truncated", "not-gzip", "zst"])
def test_prepare_names_a_damaged_archive_and_where_and_can_skip_it(tmp_path, capsys, damage):
    d = tmp_path / "corpus"
    d.mkdir()
    write_gz(d / "a-good.jsonl.gz", records(400))
    if damage == "zst":
        bad = d / "b-bad.jsonl.zst"
        import zstandard

        data = zstandard.ZstdCompressor().compress("".join(records(400, seed=1)).encode())
        bad.write_bytes(data[: len(data) // 2] + bytes(64) + data[len(data) // 2 + 64 :])  # a damaged frame
    else:
        bad = write_gz(d / "b-bad.jsonl.gz", records(400, seed=1))
        raw = bytearray(bad.read_bytes())
        if damage == "crc":
            raw[-8] ^= 0xFF  # the CRC32 in the gzip trailer
        elif damage == "truncated":
            raw = raw[: len(raw) * 2 // 3]
        else:
            raw = bytearray(b"this file is plain text with a .gz name\n" * 100)
        bad.write_bytes(bytes(raw))
    err = error_of(capsys, *prepare_cli(d))
    assert f"qtrain prepare: error: {bad}: " in err and "Traceback" not in err
    assert {"crc": "CRC check failed", "truncated": "the file is truncated", "not-gzip": "not a gzip file",
            "zst": "ZstdError"}[damage] in err
    assert "at byte " in err and "documents before that point and the other files are intact" in err
    assert "[data] skip_unreadable = true" in err
    with pytest.warns(UserWarning, match=f"{bad.name}.*the rest of this file is left out"):
        assert cli(prepare_cli(d, "data.skip_unreadable=true")) == 0
    out = capsys.readouterr().out
    train_docs, val_docs = map(int, re.search(r"training tokens in ([\d,]+) documents, [\d,]+ validation tokens in "
                                              r"([\d,]+)", out).groups())
    docs = train_docs + val_docs  # the good file's 400, and what precedes the damage in the bad one
    if damage == "not-gzip":
        assert docs == 400
    else:  # up to the last buffer read before the damage (the CRC is checked at the end of the gzip stream)
        assert 400 <= docs < 800


def test_a_full_disk_during_prepare_names_the_directory_and_a_rerun_resumes(tmp_path, capsys, monkeypatch):
    import errno

    from qtrain.data import shards

    corpus = tmp_path / "book.txt"
    corpus.write_text(prose(200_000))
    assert cli(prepare_cli(corpus)) == 0  # trains the tokenizer, then the shards
    capsys.readouterr()
    cache = Path(os.environ["QTRAIN_CACHE"])
    shutil.rmtree(cache / "shards")
    appended = []
    real_append = shards.ShardWriter.append

    def append(self, unit, end, raw_bytes):
        if len(appended) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        appended.append(1)
        return real_append(self, unit, end, raw_bytes)

    monkeypatch.setattr(shards.ShardWriter, "append", append)
    monkeypatch.setattr(shards, "SHARD_TOKENS", 1000)
    from qtrain.data import prepare

    monkeypatch.setattr(prepare, "UNIT_CHARS", 20_000)
    monkeypatch.setattr(prepare, "SHARD_TOKENS", 1000)
    err = error_of(capsys, *prepare_cli(corpus))
    out_dir = next((cache / "shards").iterdir())
    assert f"qtrain prepare: error: no space left on the disk of {out_dir}" in err and "Traceback" not in err
    assert "GB in all" in err and "GB is free there now" in err
    assert "it resumes from the last complete shard (2 complete" in err
    monkeypatch.setattr(shards.ShardWriter, "append", real_append)
    assert cli(prepare_cli(corpus)) == 0
    assert "resuming after 2 complete shard(s)" in capsys.readouterr().err


def test_data_errors_met_while_training_the_tokenizer_are_reported_as_such(tmp_path, capsys):
    lines = records(600)
    lines[500] = '{"text": "an unfinished record\n'  # the holdout scan stops early; the tokenizer sample reads on
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(lines))
    err = error_of(capsys, *prepare_cli(corpus)).split("qtrain prepare: error: ", 1)[1]
    assert err.startswith(f"{corpus}:501: invalid JSON") and "sentencepiece" not in err and "vocab_size" not in err
    from qtrain.data.tokenizer import train_tokenizer
    from qtrain.errors import DataError

    with pytest.raises(DataError, match="the tokenizer's training sample is empty"):
        train_tokenizer(iter(["   ", ""]), 300, tmp_path / "t.model")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n \n")
    err = error_of(capsys, *prepare_cli(empty))
    assert f'[data] corpus = "{empty}" contains no text' in err


# --- directories of several kinds, record formats ----------------------------------------------------------


def test_a_directory_of_text_files_and_one_jsonl_reads_them_all(tmp_path, capsys):
    d = tmp_path / "mixed"
    d.mkdir()
    for i in range(30):
        (d / f"part-{i:02d}.txt").write_text(prose(3_000, seed=i))
    (d / "extra.jsonl").write_text("".join(records(20)))
    run = tmp_path / "run"
    assert cli(["train", "tiny", "--out", str(run), "--set", f"data.corpus={d}", *[f"--set={o}" for o in SMALL]]) == 0
    out = capsys.readouterr().out
    assert f"files: {d} (31 files, 1 jsonl, 30 text," in out
    index = json.loads((Path(json.loads((run / "data.json").read_text())["sources"][0]["shards"]) / "index.json")
                       .read_text())
    paragraphs = sum((d / f"part-{i:02d}.txt").read_text().count("\n\n") + 1 for i in range(30))
    assert sum(s["train_docs"] + s["val_docs"] for s in index["shards"]) == paragraphs + 20


def test_records_with_text_and_fine_tuning_fields_are_refused_unless_data_format_says(tmp_path, capsys):
    rng = random.Random(0)
    both = tmp_path / "both.jsonl"
    rows = []
    for _ in range(300):
        words = " ".join(rng.choice(WORDS) for _ in range(10))
        rows.append(json.dumps({"text": words, "prompt": words[:20], "completion": words[20:]}) + "\n")
    both.write_text("".join(rows))
    err = error_of(capsys, "train", "tiny", "--out", str(tmp_path / "a"), "--set", f"data.corpus={both}",
                   *[f"--set={o}" for o in SMALL])
    assert f"{both}:1: the record has a \"text\" field (plain text) and 'completion', 'prompt' (fine-tuning)" in err
    assert 'set [data] format = "text"' in err and '"prompt_completion" to fine-tune' in err
    run = tmp_path / "text"
    assert cli(["train", "tiny", "--out", str(run), "--set", f"data.corpus={both}", "--set", "data.format=text",
                *[f"--set={o}" for o in SMALL]]) == 0
    assert 'format: plain text (the "text" field of each record), as [data] format = "text" says' in capsys.readouterr().out
    # fine-tuning on the same records, with the tokenizer just trained: the header counts examples and real tokens
    ft = tmp_path / "ft"
    assert cli(["train", "tiny", "--out", str(ft), "--set", f"data.corpus={both}", "--set", "data.format=prompt_completion",
                "--set", f"data.tokenizer={run / 'tokenizer.model'}", *[f"--set={o}" for o in SMALL]]) == 0
    out = capsys.readouterr().out
    assert 'format: prompt/completion records (loss on the completions), as [data] format = "prompt_completion" says' in out
    from qtrain.config.recipe import TrainConfig
    from qtrain.data.finetune import prepare_run_data

    cfg = TrainConfig.from_toml(ft / "recipe.toml")
    data = prepare_run_data(cfg, None)
    assert (len(data.train), len(data.val)) == (285, 15)
    assert (f"data: prompt_completion records: 285 training examples ({data.train.real_tokens():,} tokens, "
            f"{data.train.target_tokens():,} with loss; each padded to train.seq_len), 15 validation examples") in out
    assert "steps: 2 x 4 examples per step (1 x 4 x 1 accumulated) = 8 examples = 0.03 epochs" in out
    sampler = data.sampler(4, 64, cfg.train.seed)
    real = sum(min(data.train.inputs(i), 64) for k in (0, 1) for i in sampler.indices(k))
    logged = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in logged if "loss" in r][-1] == real < 2 * 4 * 64  # real tokens, not padded rows


# --- kill -9 of prepare ------------------------------------------------------------------------------------


def _children(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_workers_end_when_prepare_is_killed(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    small = tmp_path / "small.txt"
    small.write_text(prose(100_000))
    run = tmp_path / "tok"
    assert train_cli(small, run, "train.steps=1") == 0
    big = tmp_path / "big.txt"
    big.write_text(prose(30_000_000, seed=3))  # a minute or more of encoding on two workers
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "qtrain", "prepare", "tiny", "--quiet", "--workers", "2",
                             "--set", f"data.corpus={big}", "--set", f"data.tokenizer={run / 'tokenizer.model'}",
                             *[f"--set={o}" for o in SMALL]], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    deadline = time.time() + 120
    while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
        workers = {c for c in _children(proc.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text(errors="replace")}
        time.sleep(0.5)
    assert len(workers) == 2, "the workers did not start"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"workers {left} outlived their parent"
