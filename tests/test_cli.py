"""The `qtrain` command as a user runs it: flags refused with their valid range (no traceback), --version,
the recipes listed in --help, and a bug inside a command keeping its traceback."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qtrain.cli import commands
from qtrain.cli.main import main
from qtrain.config.shipped import shipped_recipes
from qtrain.data.dataset import open_run_data
from qtrain.errors import DataError

REPO = Path(__file__).resolve().parent.parent
FAST = ["data.max_corpus_chars=300000", "model.vocab_size=512", "train.sample_tokens=0", "train.eval_batches=2",
        "train.batch_size=4", "train.seq_len=64", "model.max_seq_len=64", "train.steps=2", "train.eval_every=100"]


def qtrain(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qtrain", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=env)


def refused(*args: str, env=None) -> str:
    """Run the command, expect a clean refusal (exit 2, no traceback) and return its stderr."""
    run = qtrain(*args, env=env)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    return run.stderr


@pytest.mark.parametrize("args, message", [
    (["estimate", "--gpu-gib", "0"], "argument --gpu-gib: must be a number > 0, got 0"),
    (["estimate", "--gpu-gib", "-5"], "argument --gpu-gib: must be a number > 0, got -5"),
    (["estimate", "--gpu-gib", "nan"], "argument --gpu-gib: must be a number > 0, got nan"),
    (["estimate", "--nproc", "0"], "argument --nproc: must be an integer >= 1, got 0"),
    (["estimate", "--nproc", "-1"], "argument --nproc: must be an integer >= 1, got -1"),
    (["train", "--nproc", "0"], "argument --nproc: must be an integer >= 1, got 0"),
    (["estimate", "--fsdp"], "estimate --fsdp shards across processes: give their number with --nproc N (N >= 2)"),
    (["generate", "RUN", "--prompt", "x", "--tokens", "-5"], "argument --tokens: must be an integer >= 1, got -5"),
    (["eval", "RUN", "--batches", "0"], "argument --batches: [train] eval_batches = 0: must be >= 1"),
    (["eval", "RUN", "--batches", "two"], "argument --batches: [train] eval_batches = two: expected an integer"),
    (["prepare", "--workers", "-1"], "argument --workers: [data] prepare_workers = -1: must be >= 0"),
])
def test_flags_are_refused_with_their_valid_range(args, message):
    assert message in refused(*args)


def test_version():
    run = qtrain("--version")
    assert run.returncode == 0 and run.stdout.strip() == "qtrain 0.1.0"


def test_train_help_lists_every_shipped_recipe():
    run = qtrain("train", "--help")
    text = " ".join(run.stdout.split())  # argparse wraps the help text
    names = sorted(shipped_recipes())
    assert {"finetune-tiny", "finetune-8b", "tiny", "7b-8gb"} <= set(names)
    listed = text.split("shipped name (")[1].split(")")[0].split(", ")
    assert sorted(listed) == names and listed[0] == "tiny"


def test_a_user_error_prints_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    def user_error(args):
        raise DataError("[data] corpus = \"x\": no such file")

    monkeypatch.setattr(commands, "cmd_plot", user_error)
    assert main(["plot", "RUN"]) == 2
    assert capsys.readouterr().err == 'qtrain plot: error: [data] corpus = "x": no such file\n'

    def bug(args):
        raise ValueError("a bug inside torch or qtrain")

    monkeypatch.setattr(commands, "cmd_plot", bug)
    with pytest.raises(ValueError, match="a bug inside torch or qtrain"):  # not turned into a one-line "error"
        main(["plot", "RUN"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    env = {**os.environ, "QTRAIN_CACHE": str(tmp_path_factory.mktemp("cache"))}
    out = tmp_path_factory.mktemp("runs") / "tiny"
    done = qtrain("train", "--quiet", "--out", str(out), *[f"--set={s}" for s in FAST], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, env


@pytest.mark.slow
def test_eval_batches_beyond_the_validation_set_says_how_many_it_holds(run_dir, monkeypatch):
    run, env = run_dir
    err = refused("eval", str(run), "--batches", "100000", env=env)
    assert "--batches 100000: the validation set holds " in err and " windows of 64 tokens = " in err
    windows = int(err.split("the validation set holds ")[1].split()[0].replace(",", ""))
    most = int(err.split("; use --batches 1 to ")[1].split()[0].replace(",", ""))
    assert most == -(-windows // 4)  # batch_size 4: the last batch may be short
    # the count is what evaluation really gets when it asks for more than there is
    monkeypatch.setenv("QTRAIN_CACHE", env["QTRAIN_CACHE"])
    trained = commands.load_trained(run, "cpu")
    data_cfg = dataclasses.replace(trained.cfg.data, tokenizer=str(trained.tokenizer_path), eval_tokens=0)
    data = open_run_data(run, data_cfg, trained.tokenizer_path)
    assert sum(len(x) for x, _ in data.val_batches(100000, 4, 64)) == windows


def _two_rank_env(tmp_path) -> dict:
    return {**os.environ, "QTRAIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.slow
def test_a_recipe_refused_under_nproc_is_printed_once_before_any_rank_starts(tmp_path):
    err = refused("train", "--nproc", "2", "--fsdp", "--out", str(tmp_path / "run"), "--set", "optim.method=galore",
                  env=_two_rank_env(tmp_path))
    assert err.count('FSDP2 shards APOLLO and APOLLO-Mini only') == 1, err
    assert err.startswith("qtrain train: error: 1 problem(s) in recipe (run on cpu, 2 processes):\n"), err
    assert not (tmp_path / "run").exists()  # nothing launched, nothing written


@pytest.mark.slow  # two torchrun ranks
def test_a_failed_rank_shows_its_error_not_torchruns_traceback(tmp_path):
    run = qtrain("train", "--nproc", "2", "--quiet", "--out", str(tmp_path / "run"), "--set",
                 f"data.corpus={tmp_path / 'missing.txt'}", env=_two_rank_env(tmp_path))
    assert run.returncode == 2, run.stderr[-3000:]
    assert f'qtrain train: error: [data] corpus = "{tmp_path / "missing.txt"}": no such file' in run.stderr
    # the rank that failed on the corpus, or the other one reporting the broken collective, may end first
    assert re.search(r"qtrain train: rank [01] of 2 failed first \(exit code 2\), its error is above\n", run.stderr)
    # torchrun's report of the same failure: its traceback, the ChildFailedError table, its log lines
    for noise in ("Traceback", "ChildFailedError", "Root Cause", "torch.distributed.elastic"):
        assert noise not in run.stderr, run.stderr[-3000:]
    assert "--resume" not in run.stderr.splitlines()[-1]  # no checkpoint to resume from
