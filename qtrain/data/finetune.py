"""Fine-tuning data: JSONL prompt/completion pairs or chat conversations, with the loss on the answers only.

`prepare_run_data(cfg, run_dir)` is what a run reads. The first record of a `.jsonl` / `.jsonl.gz` corpus
decides the kind of data:
    {"text": "..."}                                  plain text: (continued) pretraining through qtrain.data.dataset
    {"prompt": "...", "completion": "..."}           loss on the completion tokens and the EOS after them
    {"messages": [{"role": ..., "content": ...}]}    the tokenizer's chat template; loss on assistant turns
and every other record must have the same fields. Any other corpus is plain text (qtrain.data.dataset).
With `[model] init` the tokenizer is the checkpoint's (unless [data] tokenizer names one): it may have fewer
pieces than the embedding has rows (Qwen2.5 pads its embedding to 151936 for 151665 tokens), never more.

One example is one row of train.seq_len tokens: prefix prompt completion EOS (the prefix is the tokenizer's own,
qtrain.data.tokenizer.document_prefix: its BOS where `tok(text)` adds one) or the rendered conversation,
cut to seq_len + 1 tokens and padded on the right. The targets y hold -100, cross_entropy's ignore_index,
wherever no loss is wanted (prompt tokens, system and user turns, padding), so `lm_loss`'s mean is over the
answer tokens alone. Padded, not packed: under causal attention a real token never sees the padding after
it and no example sees another, so no attention mask is needed (qtrain's attention is mask-free causal SDPA,
qtrain.model.builder.CAUSAL_SDPA); the price is the compute spent on padding, so size train.seq_len to the examples.
The tokenized examples live in memory (int32 ids + a target flag per token), tokenized at each start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from qtrain.config.recipe import DataConfig
from qtrain.data.dataset import fingerprint_now, prepare_data
from qtrain.data.loader import BatchStream
from qtrain.data.protocols import RunData, Tokenizer
from qtrain.data.readers import first_json_line, json_lines
from qtrain.data.tokenizer import document_prefix, load_tokenizer, save_run_tokenizer, tokenizer_sha256
from qtrain.errors import DataError
from qtrain.hf.pretrained import checkpoint_tokenizer

IGNORE = -100  # F.cross_entropy's default ignore_index: positions without loss
PROMPT_COMPLETION, CHAT = "prompt_completion", "chat"
FIELDS = {PROMPT_COMPLETION: ("prompt", "completion"), CHAT: ("messages",)}
FIX = ('each line must be {"prompt": "...", "completion": "..."} (loss on the completion), '
       '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]} (loss on the '
       'assistant turns) or {"text": "..."} (plain text), the same kind on every line')


def prepare_run_data(cfg, run_dir: Path | None) -> RunData:
    """The data of a run: qtrain.data.dataset's Dataset for plain text, a FinetuneData for prompt/completion or chat.

    With [model] init, [data] tokenizer defaults to the checkpoint's tokenizer. Raises DataError.
    """
    data_cfg, pieces = cfg.data, cfg.model.vocab_size
    kind = finetune_kind(data_cfg)
    if cfg.model.init or kind:
        tokenizer_path = data_cfg.tokenizer or (str(checkpoint_tokenizer(cfg.model.init)) if cfg.model.init else "")
        if not tokenizer_path:
            raise DataError(f'[data] corpus = "{data_cfg.corpus}" holds fine-tuning records, which need a tokenizer: '
                            f'set [model] init to a Hugging Face checkpoint (its tokenizer is used) or [data] tokenizer')
        data_cfg = dataclasses.replace(data_cfg, tokenizer=tokenizer_path)
        pieces = load_tokenizer(tokenizer_path).get_piece_size()
        if pieces > cfg.model.vocab_size:
            raise DataError(f'[data] tokenizer "{tokenizer_path}" has {pieces} pieces but the model\'s embedding has '
                            f'{cfg.model.vocab_size} rows ([model] vocab_size): use the tokenizer that came with the '
                            f'checkpoint, or a model with at least {pieces} rows')
    if kind is None:  # plain text; the tokenizer's own size: qtrain.data.dataset checks it exactly
        data = prepare_data(data_cfg, pieces, cfg.train.seq_len, run_dir)
    else:
        data = prepare_finetune(data_cfg, kind, cfg.train.seq_len, run_dir)
    note = format_note(data_cfg, kind)
    if note:
        data.notes.insert(0, note)
    return data


# --- records -------------------------------------------------------------------------------------------


def corpus_identity_now(cfg) -> str | None:
    """The plain-text corpus identity as the files stand now, from a stat of them (no tokens, no reading), or
    None when it cannot be had that cheaply (fine-tuning records are identified by their content)."""
    if finetune_kind(cfg.data):
        return None
    return fingerprint_now(cfg.data)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    for lineno, line in json_lines(path):  # streamed; split at newlines only
        yield lineno, line.decode("utf-8", errors="replace")


def _record(path: Path, lineno: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); {FIX}") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: not a JSON object; {FIX}")
    return record


def _kind_of(record: dict, text_field: str = "text") -> str | None:
    if text_field in record:
        return None
    if "prompt" in record or "completion" in record:
        return PROMPT_COMPLETION
    if "messages" in record:
        return CHAT
    return "unknown"


def finetune_kind(data_cfg: DataConfig) -> str | None:
    """PROMPT_COMPLETION or CHAT for fine-tuning records, None for plain text: as [data] format says, or with
    "auto" as the first record of a JSONL corpus says (any other corpus, or a [data.sources] mixture, is plain
    text). A record with both [data] text_field and fine-tuning fields is refused under "auto"."""
    fmt = data_cfg.format
    path = Path(data_cfg.corpus).expanduser()
    jsonl = not data_cfg.sources and path.name.endswith((".jsonl", ".jsonl.gz")) and path.is_file()
    if fmt == "text":
        return None
    if fmt in FIELDS:
        if not jsonl:
            raise DataError(f'[data] format = "{fmt}" needs [data] corpus to be one .jsonl / .jsonl.gz file of '
                            f'records, not "{data_cfg.corpus}"{" and [data.sources]" if data_cfg.sources else ""}; '
                            f'set [data] format = "auto" or "text" for plain text')
        return fmt
    if not jsonl:
        return None
    first = first_json_line(path)  # one buffer, not the file: this runs at every start
    if first is None:
        return None
    lineno, line = first
    record = _record(path, lineno, line.decode("utf-8", errors="replace"))
    kind = _kind_of(record, data_cfg.text_field)
    if kind is None and _kind_of({k: v for k, v in record.items() if k != data_cfg.text_field}) in FIELDS:
        tuned = sorted(set(record) & {"prompt", "completion", "messages"})
        raise DataError(f'{path}:{lineno}: the record has a "{data_cfg.text_field}" field (plain text) and '
                        f'{", ".join(f"{k!r}" for k in tuned)} (fine-tuning): ambiguous; set [data] format = "text" to '
                        f'train on "{data_cfg.text_field}", or "{_kind_of({k: 1 for k in tuned})}" to fine-tune')
    if kind == "unknown":
        raise DataError(f"{path}:{lineno}: the record has fields {sorted(record)[:5]} but none of "
                        f"{data_cfg.text_field} ([data] text_field), prompt/completion, messages; {FIX}")
    return kind


def format_note(data_cfg: DataConfig, kind: str | None) -> str | None:
    """The header line saying which data format the run uses and why (None for non-JSONL plain text)."""
    fmt = data_cfg.format
    what = {None: f'plain text (the "{data_cfg.text_field}" field of each record)',
            PROMPT_COMPLETION: "prompt/completion records (loss on the completions)",
            CHAT: "chat records (the tokenizer's chat template; loss on the assistant turns)"}[kind]
    if fmt != "auto":
        return f'format: {what}, as [data] format = "{fmt}" says'
    path = Path(data_cfg.corpus).expanduser()
    if data_cfg.sources or not path.name.endswith((".jsonl", ".jsonl.gz")):
        return None
    return f'format: {what}, detected from the first record of {path} ([data] format = "auto")'


def read_records(path: Path, kind: str, minimum: int = 2) -> list[dict]:
    """Every record of a fine-tuning JSONL file, each checked to have kind's fields as strings / messages."""
    records = []
    for lineno, line in _lines(path):
        record = _record(path, lineno, line)
        where = f"{path}:{lineno}"
        if kind == PROMPT_COMPLETION:
            missing = [k for k in FIELDS[kind] if not isinstance(record.get(k), str)]
            if missing:
                raise DataError(f'{where}: no string "{missing[0]}" field (the first record is prompt/completion, '
                                f'so every line needs both); {FIX}')
            records.append({"prompt": record["prompt"], "completion": record["completion"]})
        else:
            messages = record.get("messages")
            ok = isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)
            if not ok:
                raise DataError(f'{where}: no "messages" list of {{"role": ..., "content": ...}} objects (the first '
                                f'record is a chat, so every line needs one); {FIX}')
            if not any(m["role"] == "assistant" for m in messages):
                raise DataError(f'{where}: the conversation has no "assistant" turn, so nothing to learn from it; '
                                f'add the answer as {{"role": "assistant", "content": "..."}} or drop the line')
            records.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]})
    if len(records) < minimum:
        raise DataError(f"{path} holds {len(records)} fine-tuning records; at least {minimum} are needed (with no "
                        f"[data] validation file, one for training and one for validation)")
    return records


# --- tokens and loss masks -----------------------------------------------------------------------------


def encode_prompt_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
    """(prefix prompt completion EOS, is_target per token): the completion and its EOS are targets; the prefix is
    document_prefix (the BOS the tokenizer itself adds, if any), as in pretraining documents and sampling."""
    head = document_prefix(tokenizer) + tokenizer.encode(prompt)
    tail = tokenizer.encode(completion) + [tokenizer.eos_id()]
    return head + tail, [False] * len(head) + [True] * len(tail)


def encode_chat(tokenizer, messages: list[dict], where: str = "") -> tuple[list[int], list[bool]]:
    """The conversation rendered by the tokenizer's chat template; tokens inside assistant turns are targets.

    An assistant turn spans from the end of the conversation before it rendered with the generation prompt
    to the end of the conversation up to it (its end-of-turn marker included: the model learns to stop).
    Templates that render a turn differently once later turns follow (Qwen3 drops the reasoning of earlier
    answers) fail that prefix test for the earlier turns: those are found in the text instead, the answer's
    content and the EOS token right after it.
    """
    hf = getattr(tokenizer, "hf", None)
    if hf is None or not getattr(hf, "chat_template", None):
        raise DataError(f"{where}: chat records need a tokenizer with a chat template, and this one has none; use "
                        f"the checkpoint's own tokenizer (an instruct model's), or prompt/completion records")

    def render(msgs: list[dict], generation_prompt: bool = False) -> str:
        try:
            return hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja raises its own errors (templates may reject role orders)
            raise DataError(f"{where}: the tokenizer's chat template rejects this conversation ({e})") from None

    text = render(messages)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:i], generation_prompt=True), render(messages[: i + 1])
        if upto.startswith(before) and text.startswith(upto) and len(before) >= cursor:
            start, end = len(before), len(upto)
        else:
            start = text.find(m["content"], cursor) if m["content"] else -1
            if start < 0:
                raise DataError(f"{where}: the chat template renders assistant turn {i + 1} so that it cannot be "
                                f"located in the conversation; use prompt/completion records instead")
            end = start + len(m["content"])
            if hf.eos_token and text.startswith(hf.eos_token, end):
                end += len(hf.eos_token)
        spans.append((start, end))
        cursor = end
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    targets = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), targets


# --- the dataset -----------------------------------------------------------------------------------------


@dataclass
class Examples:
    """Tokenized examples, ragged: example i is tokens[starts[i]:starts[i+1]] with its target flags."""

    tokens: np.ndarray  # (total,) int32
    is_target: np.ndarray  # (total,) bool: this token is predicted with loss
    starts: np.ndarray  # (N + 1,) int64

    def __len__(self) -> int:
        return len(self.starts) - 1

    def inputs(self, i: int) -> int:
        """Real (unpadded) input positions of example i in its row: its tokens but the last."""
        return int(self.starts[i + 1] - self.starts[i]) - 1

    def real_tokens(self) -> int:
        return int(self.starts[-1] - self.starts[0]) - len(self)

    def target_tokens(self) -> int:
        """Positions with loss: every target token but an example's first (it is never predicted)."""
        return int(self.is_target.sum()) - int(self.is_target[self.starts[:-1]].sum())

    def batch(self, indices, seq_len: int, pad_id: int) -> tuple[Tensor, Tensor]:
        """x (B, T) padded with pad_id, y (B, T) the next token where it is a target, else IGNORE."""
        x = np.full((len(indices), seq_len), pad_id, dtype=np.int64)
        y = np.full((len(indices), seq_len), IGNORE, dtype=np.int64)
        for row, i in enumerate(indices):
            ids = self.tokens[self.starts[i] : self.starts[i + 1]]
            n = len(ids) - 1
            x[row, :n] = ids[:-1]
            y[row, :n] = np.where(self.is_target[self.starts[i] + 1 : self.starts[i + 1]], ids[1:], IGNORE)
        return torch.from_numpy(x), torch.from_numpy(y)


@dataclass
class FinetuneData:
    """Prompt/completion or chat examples, split into train and validation; the interface of qtrain.data.dataset.Dataset."""

    kind: str
    train: Examples
    val: Examples
    tokenizer: Tokenizer
    tokenizer_path: Path
    corpus_sha256: str
    tokenizer_sha256: str
    pad_id: int
    truncated: int = 0  # examples cut to seq_len + 1 tokens
    dropped: int = 0  # examples whose answer starts beyond seq_len + 1 tokens: left out
    notes: list[str] = dataclasses.field(default_factory=list)  # lines for the run header

    def describe(self) -> str:
        """The header's data line: examples, and their real (unpadded) tokens."""
        tr, va = self.train, self.val
        return (f"data: {self.kind} records: {len(tr):,} training examples ({tr.real_tokens():,} tokens, "
                f"{tr.target_tokens():,} with loss; each padded to train.seq_len), {len(va):,} validation examples "
                f"({va.real_tokens():,} tokens)")

    def epoch(self) -> tuple[int, str]:
        return len(self.train), "examples"

    def identity(self) -> dict[str, str]:
        return {"corpus": self.corpus_sha256, "tokenizer": self.tokenizer_sha256}

    def record(self, run_dir: Path) -> None:
        """Copy the tokenizer into run_dir (the examples are re-read from the corpus at each start)."""
        save_run_tokenizer(self.tokenizer_path, run_dir)

    def sampler(self, batch_size: int, seq_len: int, seed: int) -> FinetuneSampler:
        return FinetuneSampler(self.train, batch_size, seq_len, seed, self.pad_id)

    def val_window_count(self, seq_len: int) -> int:
        return len(self.val)  # one example per window, padded to seq_len

    def val_batches(self, n_batches: int, batch_size: int, seq_len: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The first n_batches * batch_size validation examples in order (all of them when fewer)."""
        n = min(n_batches * batch_size, len(self.val))
        for i in range(0, n, batch_size):
            yield self.val.batch(range(i, min(i + batch_size, n)), seq_len, self.pad_id)


class FinetuneSampler(BatchStream):
    """Shuffled epochs over the training examples; batch k is a pure function of (seed, k): resume is exact.

    Position p of the example stream is example perm_e[p mod N] of epoch e = p // N, perm_e seeded by (seed, e).
    """

    SIZE_KEY = "num_examples"
    SIZE_WHAT = "the fine-tuning file and tokenizer"

    def __init__(self, examples: Examples, batch_size: int, seq_len: int, seed: int, pad_id: int):
        self.examples, self.batch_size, self.seq_len, self.seed, self.pad_id = examples, batch_size, seq_len, seed, pad_id
        self.batches_drawn = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm = (epoch, rng.permutation(len(self.examples)))
        return self._perm[1]

    def indices(self, k: int) -> list[int]:
        n = len(self.examples)
        return [int(self._permutation(p // n)[p % n]) for p in range(k * self.batch_size, (k + 1) * self.batch_size)]

    def batch_at(self, k: int) -> tuple[Tensor, Tensor]:
        """Batch k: x (B, T) padded, y (B, T) with IGNORE where no loss is wanted."""
        return self.examples.batch(self.indices(k), self.seq_len, self.pad_id)

    def tokens_at(self, k: int) -> int:
        """Real tokens of batch k (padding not counted): what tokens/s and tokens seen count."""
        return sum(self.examples.inputs(i) for i in self.indices(k))

    def size(self) -> int:
        return len(self.examples)


def _examples(encoded: list[tuple[list[int], list[bool]]]) -> Examples:
    lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.fromiter((t for ids, _ in encoded for t in ids), dtype=np.int32, count=int(starts[-1]))
    flags = np.fromiter((f for _, fl in encoded for f in fl), dtype=bool, count=int(starts[-1]))
    return Examples(tokens, flags, starts)


def prepare_finetune(data_cfg, kind: str, seq_len: int, run_dir: Path | None) -> FinetuneData:
    """Read, tokenize and split a prompt/completion or chat JSONL file ([data] corpus; the last val_fraction of the
    examples validate, or all of a [data] validation file of the same kind); copy the tokenizer into run_dir.
    Examples are cut to seq_len + 1 tokens; those left without a target are dropped (counted)."""
    path = Path(data_cfg.corpus).expanduser()
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    counts = {"truncated": 0, "dropped": 0}

    def encode_all(file: Path, records: list[dict], need: int) -> list[tuple[list[int], list[bool]]]:
        encoded = []
        for i, r in enumerate(records):
            if kind == PROMPT_COMPLETION:
                ids, targets = encode_prompt_completion(tokenizer, r["prompt"], r["completion"])
            else:
                ids, targets = encode_chat(tokenizer, r["messages"], where=f"{file}, record {i + 1}")
            if len(ids) > seq_len + 1:
                ids, targets = ids[: seq_len + 1], targets[: seq_len + 1]
                counts["truncated"] += 1
            if not any(targets[1:]):  # the first token is never predicted
                counts["dropped"] += 1
                continue
            encoded.append((ids, targets))
        if len(encoded) < need:
            raise DataError(f"{file}: only {len(encoded)} of {len(records)} examples have answer tokens within "
                            f"train.seq_len + 1 = {seq_len + 1} tokens; raise train.seq_len or shorten the prompts")
        return encoded

    records = read_records(path, kind, minimum=1 if data_cfg.validation else 2)
    h = hashlib.sha256(kind.encode())
    if data_cfg.validation:  # a separate file of the same kind: all of it validates, all of corpus trains
        val_path = Path(data_cfg.validation).expanduser()
        if not val_path.is_file() or finetune_kind(dataclasses.replace(data_cfg, corpus=str(val_path))) != kind:
            raise DataError(f'[data] validation = "{data_cfg.validation}" must be a JSONL file of the same kind of '
                            f'records as [data] corpus ({kind}), or "" to hold out val_fraction of the examples')
        val_records = read_records(val_path, kind, minimum=1)
        train, val = encode_all(path, records, 1), encode_all(val_path, val_records, 1)
        h.update(b"validation\0")
        records = records + val_records
    else:
        encoded = encode_all(path, records, 2)
        n_val = max(1, int(len(encoded) * data_cfg.val_fraction))
        train, val = encoded[:-n_val], encoded[-n_val:]
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    truncated, dropped = counts["truncated"], counts["dropped"]
    pad = getattr(getattr(tokenizer, "hf", None), "pad_token_id", None)
    pad_id = pad if pad is not None else tokenizer.eos_id()  # any id: padded positions carry no loss
    data = FinetuneData(kind, _examples(train), _examples(val), tokenizer,
                        Path(data_cfg.tokenizer), h.hexdigest(), tokenizer_sha256(data_cfg.tokenizer), int(pad_id),
                        truncated, dropped)
    if truncated or dropped:
        print(f"note: {path}: {truncated} of {len(records)} examples cut to train.seq_len + 1 = {seq_len + 1} "
              f"tokens, {dropped} left out (no answer token within that length)")
    if run_dir is not None:
        data.record(run_dir)
    return data
