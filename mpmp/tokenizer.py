"""Text <-> token ids: bytes (vocabulary 256, the default), or a Hugging Face tokenizer.json.

A tokenizer.json (GPT-2's byte-level BPE, or any other) is read with the `tokenizers` library.
Encoding adds no special tokens (a prompt or a training text is exactly its text).
"""

import os

from mpmp.errors import DataError


class ByteTokenizer:
    """UTF-8 bytes as tokens: what `--data` reads from a plain file, and the built-in corpus."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer.json through the `tokenizers` library."""

    def __init__(self, path: str, tokenizer):
        self.name, self._tok = path, tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | None):
    """ByteTokenizer for None, else the tokenizer.json at path; DataError naming the file otherwise."""
    if path is None:
        return ByteTokenizer()
    if not os.path.isfile(path):
        raise DataError(f"--tokenizer {path}: file not found")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError(
            f"--tokenizer {path}: reading tokenizer.json needs the tokenizers package (pip install 'mpmp[hf]')"
        ) from None
    try:
        return HFTokenizer(path, Tokenizer.from_file(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise DataError(f"--tokenizer {path}: not a Hugging Face tokenizer.json ({exc})") from None


class TextStream:
    """The text of a growing token list, handed out piece by piece as tokens arrive.

    A token may end inside a multi-byte character (bytes, byte-level BPE): the text decoded so far then
    ends in U+FFFD, and that tail is held back until the character is complete (as transformers'
    TextStreamer does)."""

    def __init__(self, tokenizer, ids=()):
        self.tokenizer, self.ids, self.shown = tokenizer, list(ids), len(tokenizer.decode(ids))

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown :], len(text)
        return new

    def flush(self) -> str:
        """Whatever is still held back (a character the tokens never completed)."""
        text = self.tokenizer.decode(self.ids)
        new, self.shown = text[self.shown :], len(text)
        return new
