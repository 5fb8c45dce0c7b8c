"""Training and validation windows out of token shards: random, exact to resume, the same on every rank.

`TokenStream` reads a list of memory-mapped shards as one token sequence (nothing is read until a window
is). `TokenSampler` draws training windows: micro-batch k is a pure function of (seed, k) and the token
counts, so `batch_at(k)` is O(1) at any k (resume, and ranks that draw k = step*W*A + r*A + a themselves).
With several sources (a mixture), each window first picks its source with the mixture weights, then a
start inside that source: a window never straddles two sources. `val_windows` spreads evaluation windows
evenly over a validation stream.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from qtrain.errors import DataError


class TokenStream:
    """Token arrays (memmaps of shards) concatenated virtually; len() tokens, windows() gathers across shards."""

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        self.ends = np.cumsum([len(p) for p in self.parts], dtype=np.int64)  # (S,) exclusive end of each part
        self.dtype = self.parts[0].dtype if self.parts else np.dtype(np.uint16)

    @staticmethod
    def concat(streams: Sequence[TokenStream]) -> TokenStream:
        """The streams laid end to end (one stream is returned as it is)."""
        return streams[0] if len(streams) == 1 else TokenStream([p for s in streams for p in s.parts])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def take(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start + length] as a new int64 array (it may span several shards)."""
        if len(self.parts) == 1:
            return np.asarray(self.parts[0][start : start + length], dtype=np.int64)
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.ends, start, side="right"))
        filled = 0
        while filled < length:
            base = int(self.ends[i - 1]) if i else 0
            lo = start + filled - base
            chunk = self.parts[i][lo : lo + length - filled]
            out[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
            i += 1
        return out

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(B, length) int64: tokens[s : s + length] for each start s."""
        if len(self.parts) == 1:
            idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(length)  # (B, length)
            return np.asarray(self.parts[0][idx], dtype=np.int64)  # one fancy-index copy out of the memmap
        return np.stack([self.take(int(s), length) for s in starts]) if len(starts) else np.empty((0, length), np.int64)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            return self.take(start, max(0, stop - start))[::step]
        return int(self.take(int(key) % len(self), 1)[0])


def as_stream(tokens) -> TokenStream:
    return tokens if isinstance(tokens, TokenStream) else TokenStream([np.asarray(tokens)])  # a memmap stays one


def _xy(w: np.ndarray) -> tuple[Tensor, Tensor]:
    """Windows of T+1 tokens -> x = w[:, :-1], y = w[:, 1:] as int64 (B, T) tensors."""
    t = torch.from_numpy(w)  # (B, T+1)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class BatchStream:
    """The position of a sampler whose micro-batch k is a pure function of (seed, k): next_batch, and the
    state a checkpoint keeps (seed, batches drawn, batch shape and data size, each checked on load).

    A subclass sets batch_size, seq_len, seed, batches_drawn = 0, and defines batch_at(k), `size()` and
    SIZE_KEY / SIZE_WHAT (the state key of its data size and what the user changes to keep it).
    """

    SIZE_KEY = "num_tokens"
    SIZE_WHAT = "the corpus and tokenizer"

    def batch_at(self, k: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def size(self) -> int:
        raise NotImplementedError

    def tokens_at(self, k: int) -> int:
        """Tokens micro-batch k trains on (padding excluded): batch_size x seq_len for windows of a stream."""
        return self.batch_size * self.seq_len

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """Micro-batch number batches_drawn, then count it drawn."""
        batch = self.batch_at(self.batches_drawn)
        self.batches_drawn += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "batches_drawn": self.batches_drawn, "batch_size": self.batch_size,
                "seq_len": self.seq_len, self.SIZE_KEY: self.size()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        keys = {"seed": "train.seed", "batch_size": "train.batch_size", "seq_len": "train.seq_len",
                self.SIZE_KEY: self.SIZE_WHAT}
        for key, what in keys.items():
            if state.get(key) != mine[key]:
                raise DataError(f"sampler state was saved with {key} = {state.get(key)} but this run has {mine[key]}; "
                                f"resume with the same {what}, or start a fresh run")
        self.batches_drawn = int(state["batches_drawn"])


class TokenSampler(BatchStream):
    """Random training windows; batch k's offsets are a pure function of (seed, k): resume is exact and O(1).

    tokens: one token array / TokenStream, or a list of them (a mixture) with `weights`. With one source the
    starts are uniform over every start that leaves room for the target token; windows may overlap and cross
    document boundaries (EOS marks them). state_dict() stores seed and batches drawn; a state only loads into
    a sampler with the same seed, batch shape and token count.
    """

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int, weights: Sequence[float] | None = None):
        sources = [as_stream(t) for t in tokens] if isinstance(tokens, (list, tuple)) else [as_stream(tokens)]
        for s in sources:
            assert len(s) >= seq_len + 1, f"{len(s)} tokens cannot hold one window of seq_len+1 = {seq_len + 1}"
        self.sources = sources
        self.stream = TokenStream.concat(sources)
        sizes = np.array([len(s) for s in sources], dtype=np.int64)
        self.bases = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # (S,) start of each source in self.stream
        self.highs = sizes - seq_len  # (S,) exclusive bound of a start: s + T <= n - 1
        w = np.ones(len(sources)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.batches_drawn = 0

    def offsets(self, k: int) -> np.ndarray:
        """Start positions (B,) of micro-batch k (in the sources laid end to end), from (seed, k) alone."""
        rng = np.random.Generator(np.random.PCG64([self.seed, k]))
        if len(self.sources) == 1:
            return rng.integers(0, self.highs[0], size=self.batch_size)
        src = rng.choice(len(self.sources), size=self.batch_size, p=self.weights)  # (B,) source of each window
        return self.bases[src] + rng.integers(0, self.highs[src])

    def batch_at(self, k: int) -> tuple[Tensor, Tensor]:
        """Micro-batch k: (x, y), int64 (B, T) each, with y[:, t] = x[:, t+1] and y[:, -1] the token after."""
        return _xy(self.stream.windows(self.offsets(k), self.seq_len + 1))

    def size(self) -> int:
        return len(self.stream)


def window_starts(n_tokens: int, n_windows: int, seq_len: int) -> np.ndarray:
    """Starts of up to n_windows non-overlapping windows of seq_len (+1 target) spread evenly over n_tokens.

    The stream is cut into (n_tokens - 1) // seq_len tiles; when fewer windows are asked for, they are tiles
    evenly spaced from the first to near the last, so an evaluation sees the whole validation set.
    """
    tiles = max(0, (n_tokens - 1) // seq_len)
    n = min(n_windows, tiles)
    return (np.arange(n, dtype=np.int64) * tiles // max(n, 1)) * seq_len


def val_windows(streams: Sequence, n_windows: int, seq_len: int, weights: Sequence[float] | None = None) -> np.ndarray:
    """(n, seq_len+1) int64 validation windows: n_windows shared among streams by weight, each spread evenly.

    A stream with fewer windows than its share gives them all and the rest goes to the others (by weight).
    """
    streams = [as_stream(s) for s in streams]
    w = np.ones(len(streams)) if weights is None else np.asarray(weights, dtype=np.float64)
    room = np.array([max(0, (len(s) - 1) // seq_len) for s in streams], dtype=np.int64)  # windows that fit
    counts = np.zeros(len(streams), dtype=np.int64)
    left = min(n_windows, int(room.sum()))
    while left > 0:
        open_ = counts < room
        share = np.where(open_, w, 0.0)
        share = share / share.sum() * left
        add = np.minimum(np.floor(share).astype(np.int64), room - counts)
        if add.sum() == 0:  # hand out the remainder one by one, largest remainder first
            add[np.argmax(np.where(open_, share - np.floor(share), -1.0))] = 1
        counts += add
        left -= int(add.sum())
    parts = [s.windows(window_starts(len(s), int(c), seq_len), seq_len + 1) for s, c in zip(streams, counts) if c]
    return np.concatenate(parts) if parts else np.empty((0, seq_len + 1), dtype=np.int64)


def val_batches(tokens, n_batches: int, batch_size: int, seq_len: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Up to n_batches batches of fixed non-overlapping windows spread over `tokens` (the same every call).

    When the split holds fewer than n_batches * batch_size windows, all of them are used and the last batch
    may be smaller.
    """
    yield from batches_of(val_windows([tokens], n_batches * batch_size, seq_len), batch_size)


def batches_of(windows: np.ndarray, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for i in range(0, len(windows), batch_size):
        yield _xy(np.ascontiguousarray(windows[i : i + batch_size]))
