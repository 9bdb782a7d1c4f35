"""The checkpoint's chat template (rendered with jinja2) and tokenizer (the `tokenizers` library)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from .errors import CheckpointError

GROUNDING_TOKENS = {"<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                    "<|quad_end|>"}


class Tokenizer:
    """Byte-level BPE from tokenizer.json; special tokens and padding from tokenizer_config.json."""

    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any]):
        self.tk = tokenizer
        self.pad_token = _token_text(config.get("pad_token")) or "<|endoftext|>"
        self.eos_token = _token_text(config.get("eos_token")) or "<|im_end|>"
        self.pad_id = self.token_id(self.pad_token)
        self.eos_id = self.token_id(self.eos_token)
        # Text shown to users drops control tokens but keeps the grounding markup (boxes are part of the answer).
        self.hidden_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items()
                           if t.special and t.content not in GROUNDING_TOKENS}

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise CheckpointError(f"no tokenizer.json in {path}")
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        return cls(HFTokenizer.from_file(str(path / "tokenizer.json")), config)

    def token_id(self, token: str) -> int:
        i = self.tk.token_to_id(token)
        if i is None:
            raise CheckpointError(f"the tokenizer has no token {token!r}")
        return i

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids  # Qwen2 adds no BOS

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """With skip_special_tokens, control tokens (<|im_end|>, vision placeholders, ...) are dropped but the
        grounding tokens (<|object_ref_start|>, <|box_start|>, ...) stay, so boxes survive into the text."""
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.hidden_ids]
        return self.tk.decode(ids, skip_special_tokens=False)


def _token_text(tok: Any) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


class ChatTemplate:
    def __init__(self, source: str):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # The same environment settings as transformers' apply_chat_template.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise
        self.source = source
        self.template = env.from_string(source)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ChatTemplate":
        """chat_template.json, else chat_template.jinja, else tokenizer_config.json's chat_template."""
        path = Path(path)
        if (path / "chat_template.json").exists():
            return cls(json.loads((path / "chat_template.json").read_text())["chat_template"])
        if (path / "chat_template.jinja").exists():
            return cls((path / "chat_template.jinja").read_text())
        config = path / "tokenizer_config.json"
        if config.exists() and "chat_template" in (d := json.loads(config.read_text())):
            return cls(d["chat_template"])
        raise CheckpointError(f"no chat template in {path} (chat_template.json, chat_template.jinja or "
                              "tokenizer_config.json)")

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True, add_vision_id: bool = False,
               **kwargs: Any) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    add_vision_id=add_vision_id, **kwargs)


def _raise(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


class TextStream:
    """Incremental detokenization of one sequence, with stop strings.

    `add(token)` returns the new text that is safe to show: never a broken UTF-8 character (a delta is released only
    when its decode does not end in U+FFFD) and never the start of a possible stop string. Concatenated deltas plus
    `finish()` equal the decode of all tokens, cut before the first stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | tuple[str, ...] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decode to the tail of what is already in `text`
        self.text = ""  # all decoded text so far
        self.sent = 0  # how much of `text` has been handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text (including an incomplete character at the very end, as decode shows it)."""
        if not self.stopped:
            tail = self._decode(self.ids[self.prefix:])[len(self._decode(self.ids[self.prefix:self.read])):]
            self.text += tail
            self.prefix = self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.stopped:
            for s in self.stop:
                i = self.text.find(s, max(0, self.sent - len(s) + 1))
                if i != -1:
                    self.text, self.stopped = self.text[:i], True
        end = len(self.text)
        if not final and not self.stopped:  # hold back a tail that could grow into a stop string
            for s in self.stop:
                for n in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta
