"""Every kind of corpus source, streamed: files, directories, globs, compression, Parquet, saved datasets.

Each corpus is built here, a few kilobytes. The stream must give the documents in order, resume exactly
from any recorded position, never read a file whole, and identify a corpus without reading it.
"""

import gzip
import json
import os
import re

import pytest

import qtrain.data.readers
from qtrain.config.recipe import ConfigError, TrainConfig
from qtrain.data.readers import first_json_line
from qtrain.data.sources import (
    DocumentStream,
    Position,
    file_phase,
    held_out,
    iter_documents,
    resolve_source,
    resolve_sources,
    sample_texts,
)
from qtrain.errors import DataError

DOCS = [f"document {i}: " + " ".join(f"w{i}x{j}" for j in range(i % 7 + 1)) for i in range(40)]


def texts(source, **kw):
    return [d.text for d in DocumentStream(source, **kw)]


def write_jsonl(path, docs, field="text", compress=None):
    data = "".join(json.dumps({field: d, "url": "x"}) + "\n" for d in docs).encode()
    if compress == "gz":
        data = gzip.compress(data)
    elif compress == "zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


# --- kinds ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,compress", [("a.jsonl", None), ("a.json.gz", "gz"), ("a.jsonl.gz", "gz"),
                                           ("a.jsonl.zst", "zst"), ("a.json", None)])
def test_json_lines_plain_gz_zst_with_a_text_field(tmp_path, name, compress):
    path = write_jsonl(tmp_path / name, DOCS, field="content", compress=compress)
    src = resolve_source(str(path), tmp_path, text_field="content")
    assert src.files[0].kind == "jsonl" and texts(src) == DOCS
    with pytest.raises(DataError, match=r'a.json.*:1: no string "text" field.*set \[data\] text_field'):
        texts(resolve_source(str(path), tmp_path))


def test_text_files_split_at_blank_line_runs_or_one_per_file(tmp_path):
    body = "para one\nline two\n\npara two\n\n\n\nsecond doc\n \n\t\nthird doc\n\n\n"
    (tmp_path / "a.txt").write_text(body)
    one = resolve_source(str(tmp_path / "a.txt"), tmp_path)
    assert texts(one) == [body.strip()]
    two = resolve_source(str(tmp_path / "a.txt"), tmp_path, split_blank_lines=2)
    assert texts(two) == ["para one\nline two\n\npara two", "second doc", "third doc"]
    single = resolve_source(str(tmp_path / "a.txt"), tmp_path, split_blank_lines=1)
    assert texts(single) == ["para one\nline two", "para two", "second doc", "third doc"]


def test_a_long_text_document_is_read_in_pieces_and_resumes_inside_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(qtrain.data.readers, "MAX_DOC_BYTES", 64)
    monkeypatch.setattr(qtrain.data.readers, "MAX_LINE_BYTES", 16)  # over-long lines read in chunks (UTF-8 kept whole)
    doc = "\n".join(f"line {i} é中 " + "x" * (i % 30) for i in range(60))
    (tmp_path / "big.txt").write_text(doc + "\n\n\nnext document\n")
    src = resolve_source(str(tmp_path / "big.txt"), tmp_path, split_blank_lines=2)
    stream = DocumentStream(src)
    items, positions = [], []
    for d in stream:
        items.append(d)
        positions.append(stream.position)
    assert sum(not d.last for d in items) > 5  # cut into pieces, no EOS between them
    assert "".join(d.text for d in items[:-1]) == doc and items[-1].text == "next document"
    for i, p in enumerate(positions):  # resuming at any recorded position continues exactly
        assert texts(src, start=p) == [d.text for d in items[i + 1:]]


def test_parquet_row_groups_and_resume_by_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(DOCS))), "text": DOCS[:5] + [None, "  "] + DOCS[7:]})
    pq.write_table(table, tmp_path / "c4.parquet", row_group_size=6)
    src = resolve_source(str(tmp_path / "c4.parquet"), tmp_path)
    expect = DOCS[:5] + DOCS[7:]  # null and blank texts are not documents
    stream = DocumentStream(src)
    seen = [(d.text, stream.position) for d in stream]
    assert [t for t, _ in seen] == expect
    for i, (_, p) in enumerate(seen):
        assert texts(src, start=p) == expect[i + 1:]
    with pytest.raises(DataError, match=r'no column "body" \(columns: id, text\); set \[data\] text_field'):
        texts(resolve_source(str(tmp_path / "c4.parquet"), tmp_path, text_field="body"))


def test_dataset_saved_with_hugging_face_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_dict({"text": DOCS[:30], "n": list(range(30))})
    val = datasets.Dataset.from_dict({"text": DOCS[30:], "n": list(range(10))})
    train.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(tmp_path / "dd"))
    assert texts(resolve_source(str(tmp_path / "ds"), tmp_path)) == DOCS[:30]
    assert texts(resolve_source(str(tmp_path / "dd"), tmp_path)) == DOCS[:30]  # a DatasetDict trains on "train"
    cfg = TrainConfig.from_dict({"data": {"corpus": str(tmp_path / "dd"), "validation": str(tmp_path / "dd")}}).data
    _, v = resolve_sources(cfg, tmp_path)
    assert v.files[0].kind == "arrow" and texts(v) == DOCS[30:]  # ... and validates on "validation"


def test_directory_of_parquet_shards_ignores_readme_and_hidden_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    d = tmp_path / "fineweb"
    (d / "data").mkdir(parents=True)
    (d / ".cache").mkdir()
    (d / "README.md").write_text("# dataset card, not a document")
    (d / ".cache" / "x.parquet").write_text("not read")
    for i in range(3):
        pq.write_table(pa.table({"text": DOCS[i * 10:(i + 1) * 10]}), d / "data" / f"train-{i:05d}-of-00003.parquet")
    src = resolve_source(str(d), tmp_path)
    assert [f.path.name for f in src.files] == [f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    assert texts(src) == DOCS[:30]


def test_glob_of_c4_style_shards(tmp_path):
    for i in range(3):
        write_jsonl(tmp_path / f"c4-train.{i:05d}-of-00003.json.gz", DOCS[i * 10:(i + 1) * 10], compress="gz")
    write_jsonl(tmp_path / "c4-validation.00000-of-00001.json.gz", DOCS[30:], compress="gz")
    src = resolve_source(str(tmp_path / "c4-train.*.json.gz"), tmp_path)
    assert len(src.files) == 3 and texts(src) == DOCS[:30]
    with pytest.raises(DataError, match=r'\[data\] corpus = ".*nope\*": the pattern matches no file'):
        resolve_source(str(tmp_path / "nope*"), tmp_path)


def test_first_json_line_is_streamed(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl.zst", DOCS, compress="zst")
    lineno, line = first_json_line(path)
    assert lineno == 1 and json.loads(line)["text"] == DOCS[0]


def test_no_file_is_read_whole(tmp_path, monkeypatch):
    """Line readers pull the file through a bounded buffer: a 4 MB JSONL file streams without a whole read."""
    big = write_jsonl(tmp_path / "big.jsonl.gz", [d * 40 for d in DOCS] * 100, compress="gz")
    reads = []
    real = gzip.GzipFile.read

    def spy(self, size=-1):
        reads.append(size)
        return real(self, size)

    monkeypatch.setattr(gzip.GzipFile, "read", spy)
    stream = DocumentStream(resolve_source(str(big), tmp_path))
    first = next(iter(stream))
    assert first.text == DOCS[0] * 40 and reads and all(0 < r <= 1 << 20 for r in reads)


# --- identity, held-out documents, sampling ------------------------------------------------------------


def test_fingerprint_is_stat_only_unless_content_is_asked_for(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", DOCS)
    src = resolve_source(str(path), tmp_path)
    stat, content = src.fingerprint("stat"), src.fingerprint("content")
    monkeypatch.setattr("builtins.open", lambda *a, **k: pytest.fail("stat fingerprint opened a file"))
    assert resolve_source(str(path), tmp_path).fingerprint("stat") == stat
    monkeypatch.undo()
    os.utime(path, ns=(1, 1))  # touched: same bytes
    touched = resolve_source(str(path), tmp_path)
    assert touched.fingerprint("stat") != stat and touched.fingerprint("content") == content
    other_field = resolve_source(str(path), tmp_path, text_field="body")
    assert other_field.fingerprint("content") != content  # the options that change the documents count


def test_held_out_documents_are_one_in_every_1_over_f_of_each_file():
    for fraction in (0.05, 0.1, 0.3):
        for i in range(5):
            flags = [held_out(j, file_phase(i), fraction) for j in range(1000)]
            assert sum(flags) in (int(1000 * fraction), int(1000 * fraction) + 1)
            gaps = {b - a for a, b in zip(*[[j for j, f in enumerate(flags) if f]] * 2) if b > a}
            assert all(j + 1 / fraction - 1 >= 0 for j in gaps)
    phases = {round(file_phase(i), 6) for i in range(20)}
    assert len(phases) == 20  # files differ in where their stride starts


def test_tokenizer_sample_is_training_documents_only_spread_over_files(tmp_path):
    for i in range(40):
        write_jsonl(tmp_path / f"shard-{i:02d}.jsonl", [f"shard {i} doc {j}" for j in range(20)])
    src = resolve_source(str(tmp_path / "shard-*.jsonl"), tmp_path)
    sample = list(sample_texts([src], 16 * 60, val_fraction=0.1))
    shards = sorted({int(re.match(r"shard (\d+)", t).group(1)) for t in sample})
    assert len(shards) == 16 and shards[0] == 0 and shards[-1] == 39  # 16 files, first to last
    val = {d.text for d in DocumentStream(src, val_fraction=0.1) if d.val}
    assert val and not val & set(sample)  # never a held-out document


def test_max_corpus_chars_cuts_the_stream_exactly(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", DOCS)
    got = list(iter_documents(str(path), tmp_path, 100))
    assert sum(map(len, got)) == 100 and got[:-1] == DOCS[: len(got) - 1]


def test_mixture_sources_are_validated_and_resolved(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", DOCS)
    b = write_jsonl(tmp_path / "b.jsonl", DOCS, field="content")
    cfg = TrainConfig.from_dict({"data": {"sources": {str(a): 3, str(b): {"weight": 1, "text_field": "content"}}}})
    train, val = resolve_sources(cfg.data, tmp_path)
    assert [s.weight for s in train] == [3.0, 1.0] and texts(train[1]) == DOCS and val is None
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"data": {"corpus": str(a), "sources": {str(a): 0, str(b): {"wieght": 1}}}})
    assert "leave corpus = \"default\"" in str(e.value) and "the weight must be a number > 0, got 0" in str(e.value)
    assert "unknown key 'wieght' (did you mean 'weight'?)" in str(e.value)


def test_missing_paths_name_the_recipe_key(tmp_path):
    with pytest.raises(DataError, match=r'\[data\] validation = ".*gone": no such file or directory'):
        resolve_sources(TrainConfig.from_dict({"data": {"validation": str(tmp_path / "gone")}}).data, tmp_path)
    with pytest.raises(DataError, match=r'\[data.sources\] ".*gone": no such file'):
        resolve_sources(TrainConfig.from_dict({"data": {"sources": {str(tmp_path / "gone"): 1}}}).data, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="the directory has no .txt or .md files and no .jsonl"):
        resolve_source(str(tmp_path / "empty"), tmp_path)


def test_positions_serialize(tmp_path):
    p = Position(2, 100, True, 7, 1234)
    assert Position.from_dict(json.loads(json.dumps(p.to_dict()))) == p
