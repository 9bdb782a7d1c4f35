"""The checkpoint's chat template (rendered with jinja2) and tokenizer (the `tokenizers` library)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from .errors import CheckpointError


class Tokenizer:
    """Byte-level BPE from tokenizer.json; special tokens and padding from tokenizer_config.json."""

    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any]):
        self.tk = tokenizer
        self.pad_token = _token_text(config.get("pad_token")) or "<|endoftext|>"
        self.eos_token = _token_text(config.get("eos_token")) or "<|im_end|>"
        self.pad_id = self.token_id(self.pad_token)
        self.eos_id = self.token_id(self.eos_token)

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
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)


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
