"""Structured output: decoding constrained to a JSON schema, any JSON object, a regex or a choice, by xgrammar.

The compiler is built once per tokenizer. Each constrained sequence gets its own matcher; before sampling, the
rows with matchers get their logits masked to the tokens the grammar allows next. JSON is compiled without free
whitespace (compact separators): small models given room for whitespace tend to loop on it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConstraintError, InputError

COMPACT = (",", ":")  # JSON separators: no whitespace at all between tokens


@dataclass(frozen=True)
class Constraint:
    """What a request asks its output to match; exactly one field is set."""
    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None

    @classmethod
    def of(cls, json_schema: Any = None, regex: str | None = None, choice: Any = None,
           json_object: bool = False) -> "Constraint | None":
        given = [n for n, v in (("json_schema", json_schema), ("regex", regex), ("choice", choice),
                                ("json_object", json_object)) if v]
        if not given:
            return None
        if len(given) > 1:
            raise InputError(f"give one output constraint, not {' and '.join(given)}")
        if choice is not None and (isinstance(choice, str) or not all(isinstance(c, str) and c for c in choice)):
            raise InputError("choice must be a list of non-empty strings")
        return cls(json_schema, json_object, regex, tuple(choice) if choice else None)


class Grammars:
    """Compiles constraints for one tokenizer into xgrammar grammars over the logits' full width."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        try:
            import xgrammar as xgr
        except ImportError:
            raise ImportError("structured output needs xgrammar: pip install 'qwen2vl[structured]'") from None

        self.xgr, self.vocab_size = xgr, vocab_size
        encoded = [""] * vocab_size  # ids past the tokenizer's (the embedding's padding) never match
        for token, i in tokenizer.tk.get_vocab(with_added_tokens=True).items():
            if i < vocab_size:
                encoded[i] = token
        info = xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab_size,
                                 stop_token_ids=stop_token_ids)
        self.compiler = xgr.GrammarCompiler(info)

    def compile(self, c: Constraint):
        """A compiled grammar; ConstraintError (an InputError) naming the problem when it cannot be compiled."""
        try:
            if c.json_schema is not None:
                schema = c.json_schema if isinstance(c.json_schema, str) else json.dumps(c.json_schema)
                return self.compiler.compile_json_schema(schema, any_whitespace=False, separators=COMPACT)
            if c.json_object:
                return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                         separators=COMPACT)
            if c.regex is not None:
                return self.compiler.compile_regex(c.regex)
            rule = " | ".join(json.dumps(s, ensure_ascii=False) for s in c.choice)
            return self.compiler.compile_grammar(self.xgr.Grammar.from_ebnf(f"root ::= {rule}"))
        except (RuntimeError, ValueError, TypeError) as e:
            kind = "JSON schema" if c.json_schema is not None else "regex" if c.regex is not None else "constraint"
            raise ConstraintError(f"the {kind} cannot be compiled: {_clean(e)}") from None

    def matcher(self, grammar) -> "Matcher":
        return Matcher(self.xgr.GrammarMatcher(grammar), self)


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher, grammars: Grammars):
        self.m, self.grammars = matcher, grammars

    def accept(self, token: int) -> None:
        if not self.m.is_terminated():
            self.m.accept_token(token)

    @property
    def done(self) -> bool:
        return self.m.is_terminated()


def mask_logits(logits: torch.Tensor, matchers: list[Matcher | None]) -> None:
    """Set to -inf, in place, the logits (B, V) each constrained row's grammar forbids next."""
    rows = [i for i, m in enumerate(matchers) if m is not None and not m.done]
    if not rows:
        return
    xgr = matchers[rows[0]].grammars.xgr
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
    for i in rows:
        matchers[i].m.fill_next_token_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)


def _clean(e: Exception) -> str:
    """xgrammar's message without its log prefix ("[time] file.cc:line: ")."""
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(e).strip())
