"""The two interfaces the rest of qtrain uses of the data package: a tokenizer, and a run's data.

Declared here so callers (training loop, evaluation, sampling, the CLI) depend on what they call, not on
which class stands behind it: a sentencepiece model or a Hugging Face tokenizer (qtrain.hf.tokenizer), plain
text (qtrain.data.dataset.Dataset) or fine-tuning records (qtrain.data.finetune.FinetuneData).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

from torch import Tensor

from qtrain.data.loader import BatchStream


@runtime_checkable
class Tokenizer(Protocol):
    """sentencepiece.SentencePieceProcessor's methods that qtrain calls (HFTokenizer offers the same)."""

    def encode(self, text, num_threads: int = 0):
        """Token ids of a text (list[int]), or of each text of a list (list[list[int]])."""

    def decode(self, ids) -> str: ...

    def bos_id(self) -> int:
        """The beginning-of-sequence id, -1 when the tokenizer has none (Qwen)."""

    def eos_id(self) -> int:
        """The id that ends every document."""

    def get_piece_size(self) -> int:
        """The vocabulary size: ids are in [0, get_piece_size())."""


@runtime_checkable
class RunData(Protocol):
    """What training, evaluation and `qtrain eval` use of a run's data, plain text or fine-tuning records."""

    tokenizer: Tokenizer
    tokenizer_path: Path
    notes: list[str]  # lines for the run header: how validation was formed, the detected record format

    def describe(self) -> str:
        """The run header's data line: the sources and how much training and validation data they hold."""

    def epoch(self) -> tuple[int, str]:
        """What one pass over the training data is: (tokens, "tokens") of plain text, (examples, "examples") of
        fine-tuning records (each padded to a row of its own)."""

    def identity(self) -> dict[str, str]:
        """{"corpus": sha256, "tokenizer": sha256}: a checkpoint records it, a resume or eval compares it."""

    def sampler(self, batch_size: int, seq_len: int, seed: int) -> BatchStream:
        """The training batches: micro-batch k a pure function of (seed, k), its position checkpointed."""

    def val_batches(self, n_batches: int, batch_size: int, seq_len: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Fixed validation batches (x, y), the same at every evaluation."""

    def val_window_count(self, seq_len: int) -> int:
        """How many validation windows (examples) of seq_len tokens there are: val_batches gives no more."""
