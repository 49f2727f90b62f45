"""Text in, text out for imported models: ``tokenizer.json`` and the chat template.

The tokenizer is read with the ``tokenizers`` package (the Rust tokenizer transformers' fast
tokenizers wrap); the chat template comes from ``chat_template.jinja`` or
``tokenizer_config.json``'s ``chat_template`` and is rendered with jinja2 the way
transformers' ``apply_chat_template`` does (``utils/chat_template_utils.py``, transformers
5.x): an immutable sandbox with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension, ``raise_exception``, ``strftime_now`` and a ``tojson`` filter that does not escape
HTML; the rendered text is tokenized without adding special tokens (the template writes
them). Without a template the prompt is tokenized as plain text, with the special tokens the
tokenizer's post-processor adds (e.g. a BOS).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from ec2moe_jax.files import get_field, read_json
from ec2moe_jax.models.hf_config import UnsupportedCheckpoint


def _token_text(value: Any) -> str | None:
    """A special token as saved: a string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _render(template: str, messages: list[dict], special: dict[str, str | None]) -> str:
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        # {% generation %} marks assistant text for transformers' masks; rendering keeps it.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body
                                          ).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            tools=None, documents=None, **special)


class HFTokenizer:
    """The tokenizer and chat template of a Hugging Face folder.

    Attributes:
      chat_template: the jinja2 template text, or None.
      eos_ids: token ids that end a generation (the tokenizer's ``eos_token`` and
        ``generation_config.json``'s ``eos_token_id``).
    """

    def __init__(self, folder: str):
        from tokenizers import Tokenizer

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no tokenizer.json in {folder!r}: text prompts need the model's tokenizer "
                "(copy tokenizer.json and tokenizer_config.json next to config.json), or "
                "give --prompt-ids")
        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # the Rust parser raises a bare Exception
            raise ValueError(f"tokenizer {path!r} cannot be read: {e}") from None
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        what = "tokenizer config"
        cfg = read_json(cfg_path, what=what) if os.path.isfile(cfg_path) else {}
        self.special = {k: _token_text(cfg.get(k)) for k in
                        ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.chat_template = self._template(folder, cfg, cfg_path)
        self.eos_ids = self._eos_ids(folder)

    @staticmethod
    def _template(folder: str, cfg: dict, cfg_path: str) -> str | None:
        jinja = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                return f.read()
        template = get_field(cfg, "chat_template", (str, list), path=cfg_path,
                             what="tokenizer config", default=None) if cfg else None
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if not isinstance(named.get("default"), str):
                raise ValueError(f"tokenizer config {cfg_path!r}: field 'chat_template' lists "
                                 f"templates {sorted(map(str, named))} but none named 'default'")
            template = named["default"]
        return template

    def _eos_ids(self, folder: str) -> tuple[int, ...]:
        ids = set()
        eos = self.special.get("eos_token")
        if eos is not None and self.tokenizer.token_to_id(eos) is not None:
            ids.add(self.tokenizer.token_to_id(eos))
        gen = os.path.join(folder, "generation_config.json")
        if os.path.isfile(gen):
            value = get_field(read_json(gen, what="generation config"), "eos_token_id",
                              (int, list), path=gen, what="generation config", default=None)
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
        return tuple(sorted(i for i in ids if isinstance(i, int)))

    def encode(self, text: str, chat: bool = True) -> list[int]:
        """Token ids of a user prompt: the chat template around it (a single user message and
        the generation prompt) when the folder has one and ``chat``, else the plain text."""
        if chat and self.chat_template is not None:
            import jinja2

            try:
                rendered = _render(self.chat_template,
                                   [{"role": "user", "content": text}], self.special)
            except jinja2.TemplateError as e:
                raise UnsupportedCheckpoint(f"the chat template failed to render: {e}; give "
                                            "--no-chat-template for the plain prompt") from None
            return self.tokenizer.encode(rendered, add_special_tokens=False).ids
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        """Text of generated ``ids``, cut before the first end-of-sequence token."""
        ids = [int(i) for i in ids]
        cut = next((n for n, i in enumerate(ids) if i in self.eos_ids), len(ids))
        return self.tokenizer.decode(ids[:cut], skip_special_tokens=True)


def load_tokenizer(folder: str) -> HFTokenizer:
    """:class:`HFTokenizer` of ``folder``.

    Raises:
      FileNotFoundError: no ``tokenizer.json``.
      ValueError: an unreadable tokenizer or a malformed ``tokenizer_config.json`` (named).
    """
    return HFTokenizer(folder)
