"""Chat messages → prompt token ids, with the checkpoint's own chat template.

`tokenizer_config.json` holds `chat_template` (a Jinja template; `chat_template.jinja` beside it wins,
as transformers saves it) and the special tokens it names
(`bos_token`, `eos_token`, ...). The template is rendered as transformers' `apply_chat_template`
does: a sandboxed Jinja environment with trim_blocks and lstrip_blocks, `raise_exception`, a
`tojson` that does not escape HTML, `strftime_now`, and the special tokens as variables. The text it
renders is then tokenized with the special tokens the template wrote as text (`<s>` in Mixtral-
Instruct's `{{ bos_token }}[INST]`) turned into their ids, never into the characters `<`, `s`, `>`;
each run of plain text between them is encoded by sentencepiece as a piece of its own (as the
Llama/Mixtral tokenizers do in their default, "legacy" mode).
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import Tokenizer


class ChatError(ValueError):
    """The conversation cannot be rendered (the template raised, a message is malformed)."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class ChatTemplate:
    def __init__(self, template: str, special_tokens: dict[str, str], added: dict[str, int]) -> None:
        def raise_exception(message: str):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(template)
        except jinja2.exceptions.TemplateError as e:
            raise ChatError(f"the checkpoint's chat template does not compile: {e}") from None
        # A template that reads `tools` renders them itself (Mistral's [AVAILABLE_TOOLS] ...).
        self.uses_tools = "tools" in template
        self.special_tokens = special_tokens  # bos_token, eos_token, ... → their text
        self.added = added  # special token text → id, from added_tokens_decoder
        self._jinja = jinja2

    @classmethod
    def from_dir(cls, directory: str | Path) -> "ChatTemplate | None":
        """The checkpoint's template, or None when it has none (no tokenizer_config.json or no
        chat_template in it)."""
        path = Path(directory) / "tokenizer_config.json"
        jinja_file = Path(directory) / "chat_template.jinja"  # where transformers saves it nowadays
        if not path.exists() and not jinja_file.exists():
            return None
        try:
            config = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, json.JSONDecodeError) as e:
            raise ChatError(f"{path}: not valid JSON ({e})") from None
        template = jinja_file.read_text() if jinja_file.exists() else config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if not isinstance(template, str) or not template:
            return None
        specials = {k: t for k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                                   "mask_token") if (t := _token_text(config.get(k)))}
        added = {}
        for token_id, info in (config.get("added_tokens_decoder") or {}).items():
            if isinstance(info, dict) and info.get("special", True) and _token_text(info):
                added[_token_text(info)] = int(token_id)
        return cls(template, specials, added)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        if not isinstance(messages, list) or not messages:
            raise ChatError("messages must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ChatError(f"messages[{i}] must be an object with a string role")
        try:  # tools and documents as transformers passes them (None when there are none)
            return self.template.render(messages=messages, tools=tools, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except self._jinja.exceptions.TemplateError as e:
            raise ChatError(f"the chat template refused the conversation: {e}") from None
        except Exception as e:  # noqa: BLE001 — e.g. a template indexing a key a message lacks
            raise ChatError(f"the chat template failed on these messages ({type(e).__name__}: {e})") from None

    def encode(self, tokenizer: Tokenizer, text: str) -> list[int]:
        """Rendered text → ids: special tokens written as text become their ids."""
        specials: dict[str, int] = dict(self.added)
        for piece in self.special_tokens.values():
            token_id = tokenizer.sp.PieceToId(piece)
            if token_id != tokenizer.sp.unk_id() or piece == tokenizer.sp.IdToPiece(tokenizer.sp.unk_id()):
                specials.setdefault(piece, token_id)
        if not specials:
            return tokenizer.encode(text, bos=False)
        pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
        ids, start = [], 0
        for m in pattern.finditer(text):
            if m.start() > start:
                ids += tokenizer.encode(text[start:m.start()], bos=False)
            ids.append(specials[m.group()])
            start = m.end()
        if start < len(text):
            ids += tokenizer.encode(text[start:], bos=False)
        return ids

    def prompt_ids(self, tokenizer: Tokenizer, messages: list[dict[str, Any]],
                   tools: list[dict] | None = None) -> list[int]:
        return self.encode(tokenizer, self.render(messages, tools=tools))
