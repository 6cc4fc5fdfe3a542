"""The model's chat template (Jinja, as Hugging Face ships it), rendered in a sandbox.

Rendering follows transformers' `apply_chat_template` environment (trim_blocks, lstrip_blocks,
`raise_exception`, `tojson`) so templates written for it give the same prompt here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("system", "user", "assistant", "tool")


def _raise(message: str) -> None:
    raise TemplateError(message)


def _special(config: dict[str, Any], name: str) -> str:
    token = config.get(name) or ""
    return token.get("content", "") if isinstance(token, dict) else token


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str
    eos_token: str

    @classmethod
    def read(cls, folder: Path) -> ChatTemplate | None:
        """The folder's template (chat_template.jinja, else tokenizer_config.json's); None without one."""
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        source = (folder / TEMPLATE_FILE).read_text() if (folder / TEMPLATE_FILE).exists() \
            else config.get("chat_template")
        if not isinstance(source, str):
            return None
        return cls(source, _special(config, "bos_token"), _special(config, "eos_token"))

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES \
                    or not isinstance(message.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{'role': one of {', '.join(ROLES)}, 'content': text}}")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        try:
            return env.from_string(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                       bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as exc:  # raise_exception in the template, e.g. roles out of order
            raise ValueError(f"the chat template refuses these messages: {exc}") from None
