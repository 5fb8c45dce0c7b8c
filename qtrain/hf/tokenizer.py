"""A Hugging Face tokenizer (tokenizer.json, or a model directory) behind the sentencepiece calls qtrain makes.

qtrain's data, sampling and evaluation code call encode / decode / bos_id / eos_id / get_piece_size, the
sentencepiece processor's names; this wrapper gives a transformers fast tokenizer the same five, so the
rest of qtrain never asks which kind it holds. Local files only: nothing is fetched from a hub.
"""

from __future__ import annotations

from pathlib import Path

from qtrain.errors import DataError

TOKENIZER_JSON = "tokenizer.json"
# Files a tokenizer directory may hold; all that exist travel with a run and with an export.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


# The EOS of a bare tokenizer.json (no tokenizer_config.json beside it): the first of these that it defines as
# a special token (LLaMA / Mistral, GPT-2 / Qwen, Gemma, LLaMA 3).
EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")


class HFTokenizer:
    """encode/decode like sentencepiece; `.hf` is the transformers tokenizer (chat templates, special tokens)."""

    def __init__(self, path: Path):
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        path = Path(path)
        try:
            if path.is_dir():
                self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            else:
                self.hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
        except Exception as e:  # transformers raises OSError, ValueError, or its own errors
            raise DataError(f'[data] tokenizer = "{path}" could not be loaded as a Hugging Face tokenizer ({e})') from None
        self.path = path
        if self.hf.eos_token_id is None:
            self._guess_eos()
        if self.eos_id() < 0:
            raise DataError(f'[data] tokenizer = "{path}" defines no EOS token; qtrain separates documents with '
                            f'EOS, so use a tokenizer that defines eos_token')
        self._prefix = self._added_prefix()

    def _added_prefix(self) -> list[int]:
        """The ids this tokenizer itself puts in front of a text (`tok(text)`): its BOS where add_bos_token or its
        post-processor says so (Llama's <s>, Llama 3's <|begin_of_text|>), none for GPT-2-style byte-level BPE
        (SmolLM2, Qwen) even when it names a bos_token."""
        probe = "Hello"
        plain = self.hf.encode(probe, add_special_tokens=False)
        full = self.hf.encode(probe, add_special_tokens=True)
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                return list(full[:i])
        return []

    def _guess_eos(self) -> None:
        """A bare tokenizer.json (or a directory with no tokenizer_config.json) names no EOS: take its special
        token with a conventional EOS name, if any."""
        special = {t.content for t in self.hf.backend_tokenizer.get_added_tokens_decoder().values() if t.special}
        for name in EOS_NAMES:
            if name in special:
                self.hf.eos_token = name
                return

    def encode(self, text, num_threads: int = 0):
        """Token ids without special tokens: a list for a str, a list of lists for a list of str."""
        if isinstance(text, str):
            return self.hf.encode(text, add_special_tokens=False)
        return self.hf(list(text), add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def prefix_ids(self) -> list[int]:
        """The ids a document, a fine-tuning example and a sampling prompt start with (qtrain.data.tokenizer.
        document_prefix): what transformers' `tok(text)` puts in front of the text."""
        return list(self._prefix)

    def id_to_piece(self, i: int) -> str:
        return self.hf.convert_ids_to_tokens(int(i))

    def bos_id(self) -> int:
        return -1 if self.hf.bos_token_id is None else int(self.hf.bos_token_id)

    def eos_id(self) -> int:
        return -1 if self.hf.eos_token_id is None else int(self.hf.eos_token_id)

    def get_piece_size(self) -> int:
        return len(self.hf)

    def files(self) -> list[Path]:
        """The files that define this tokenizer (what a run directory and an export copy)."""
        return tokenizer_files(self.path)


def tokenizer_files(path: Path) -> list[Path]:
    """The files that define the Hugging Face tokenizer at path (a tokenizer.json, or those of a directory):
    found by name, without loading the tokenizer."""
    path = Path(path)
    if path.is_file():
        return [path]
    return [path / name for name in TOKENIZER_FILES if (path / name).is_file()]


def is_hf_tokenizer(path: Path) -> bool:
    """A tokenizer.json file, or a directory holding one (a Hugging Face model or tokenizer directory)."""
    path = Path(path)
    return (path.is_file() and path.suffix == ".json") or (path.is_dir() and (path / TOKENIZER_JSON).is_file())
