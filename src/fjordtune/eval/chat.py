"""Chat-template rendering of lm-eval prompts, exactly as lm-eval 0.4.13's `hf` model does it.

`HFLM.apply_chat_template` (`lm_eval/models/huggingface.py`) calls the tokenizer's
`apply_chat_template(tokenize=False, add_generation_prompt=..., continue_final_message=not
add_generation_prompt, **chat_template_args)`. When the template raises a `jinja2` `TemplateError`
(Mistral- and Gemma-style templates reject a system message with `raise_exception`), it drops every
system message and renders again: the `system_instruction` (and any task `description`) is then
silently left out of every prompt. We do the same, so scores stay equal to `hf`'s, but say so once
instead of once per prompt.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

_WARNED: set[str] = set()  # templates already reported as dropping the system message (once per process)


def template_sha256(template: str | None) -> str | None:
    """SHA-256 of a chat template's text, to record which template scored a run (None: no template)."""
    return None if template is None else hashlib.sha256(template.encode("utf-8")).hexdigest()


def render_chat(tokenizer: Any, chat_history: list[dict[str, str]], *, add_generation_prompt: bool = True,
                chat_template_args: Mapping[str, Any] | None = None) -> str:
    """Render `chat_history` with the tokenizer's chat template the way `HFLM.apply_chat_template` does,
    including its retry without system messages when the template raises a `TemplateError`."""
    import jinja2

    kwargs = dict(chat_template_args or {})

    def render(history: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=not add_generation_prompt, **kwargs)

    try:
        return render(chat_history)
    except jinja2.exceptions.TemplateError as e:
        without_system = [msg for msg in chat_history if msg["role"] != "system"]
        _warn_dropped_system_once(tokenizer, e, dropped=len(chat_history) - len(without_system))
        return render(without_system)


def _warn_dropped_system_once(tokenizer: Any, error: Exception, *, dropped: int) -> None:
    if not dropped:
        return  # nothing to drop: the retry raises the same error, as lm-eval's does
    key = f"{getattr(tokenizer, 'name_or_path', '')}:{template_sha256(str(tokenizer.chat_template))}"
    if key in _WARNED:
        return
    _WARNED.add(key)
    log.warning(
        "the chat template of %s refused a conversation with a system message (%s): rendering every such prompt "
        "without it, as lm-eval's hf model does; eval.system_instruction and any task description are NOT in "
        "the prompts (said once, not per prompt)", getattr(tokenizer, "name_or_path", "the tokenizer"), error)
