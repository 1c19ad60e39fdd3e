"""Chat completions with transformers' `generate`: the CPU (and small-GPU) engine of `fjordtune serve`.

`ChatEngine` holds one model and its tokenizer and turns a checked `ChatRequest` into a completion or a
stream of chunks. It needs neither Ray nor a web framework (the Serve deployment in `serve/app.py`
wraps it), so the same code answers in a test, on a laptop and on the device machine.

The prompt is the model's own chat template (`tokenizer.apply_chat_template(messages,
add_generation_prompt=True)`), tokenized exactly as transformers does it, and `temperature: 0` is
`generate(do_sample=False)`: the answer is transformers' greedy answer, token for token. A template that
refuses the conversation (wrong role order, a system message it does not take) is a 400 with the
template's own message, never a silently changed prompt. One `generate` runs at a time per engine: on
CPUs a second one would only share the same cores; concurrency limits are the server's job.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fjordtune.serve.protocol import (
    ApiError,
    ChatRequest,
    Limits,
    chunk,
    completion,
    completion_id,
    new_tokens_for,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    request: ChatRequest
    input_ids: Any
    """(1, prompt_tokens) token ids of the rendered chat."""
    max_new_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])


class ChatEngine:
    def __init__(self, model: Any, tokenizer: Any, *, model_id: str, max_tokens: int) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        if tokenizer.chat_template is None:
            raise ValueError(f"{model_id}: the tokenizer has no chat template; a chat server needs one "
                             "(add chat_template.jinja to the model folder)")
        context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or max_tokens + 1
        self.limits = Limits(max_tokens=max_tokens, context_length=context)
        self._lock = threading.Lock()
        self.eos_ids = _eos_ids(model, tokenizer)

    @classmethod
    def from_folder(cls, model_dir: str, *, model_id: str, max_tokens: int, dtype: str = "float32",
                    device: str = "cpu", device_map: str | None = None) -> ChatEngine:
        """Load a plain model folder through the verified loader (every tensor matched to a parameter);
        `device_map="auto"` spreads the layers over every visible GPU."""
        from fjordtune.model.load import load_causal_lm, load_tokenizer

        return cls(load_causal_lm(model_dir, dtype=dtype, device=device, device_map=device_map),
                   load_tokenizer(model_dir), model_id=model_id, max_tokens=max_tokens)

    def prepare(self, req: ChatRequest) -> Prepared:
        """Render and tokenize the chat; check the prompt against the context (400s, before any generation)."""
        import jinja2

        try:
            ids = self.tokenizer.apply_chat_template(req.chat(), add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)["input_ids"]
        except jinja2.TemplateError as e:
            raise ApiError(400, f"messages: the model's chat template refuses this conversation: {e}",
                           param="messages") from None
        ids = ids.to(self.model.device)
        return Prepared(req, ids, new_tokens_for(req, prompt_tokens=int(ids.shape[1]), limits=self.limits))

    def complete(self, prepared: Prepared) -> dict[str, Any]:
        """A whole `chat.completion`."""
        ids = self._generate(prepared, streamer=None)
        text, finish = self._finish(prepared, ids)
        return completion(id=completion_id(), model=self.model_id, text=text, finish_reason=finish,
                          prompt_tokens=prepared.prompt_tokens, completion_tokens=len(ids))

    def stream(self, prepared: Prepared) -> Iterator[dict[str, Any]]:
        """`chat.completion.chunk`s as tokens come: the role, then text deltas (held back only while they
        could still be the start of a stop sequence), then the finish reason and, when asked, the usage.
        Closing the iterator early (a client that went away) stops the generation at its next token."""
        cid, created = completion_id(), int(time.time())
        tokens: queue.Queue[Any] = queue.Queue()
        cancel = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self._generate(prepared, streamer=_QueueStreamer(tokens), cancel=cancel)
            except BaseException as e:  # handed to the consumer, which raises it
                failure.append(e)
            finally:
                tokens.put(None)

        worker = threading.Thread(target=run, name="fjordtune-generate", daemon=True)
        worker.start()
        yield chunk(id=cid, model=self.model_id, created=created, delta={"role": "assistant", "content": ""})
        ids: list[int] = []
        sent = ""
        hold = max((len(s) for s in prepared.request.stop_strings()), default=1) - 1
        try:
            while (item := tokens.get()) is not None:
                ids.extend(item)
                text, stopped = self._text(prepared, ids)
                safe = text if stopped else _safe_prefix(text, hold)
                if len(safe) > len(sent):
                    yield chunk(id=cid, model=self.model_id, created=created, delta={"content": safe[len(sent):]})
                    sent = safe
            worker.join()
            if failure:
                raise failure[0]
            text, finish = self._finish(prepared, ids)
            if len(text) > len(sent):
                yield chunk(id=cid, model=self.model_id, created=created, delta={"content": text[len(sent):]})
            yield chunk(id=cid, model=self.model_id, created=created, finish_reason=finish)
            opts = prepared.request.stream_options
            if opts is not None and opts.include_usage:
                yield chunk(id=cid, model=self.model_id, created=created,
                            usage_of=(prepared.prompt_tokens, len(ids)))
        finally:
            cancel.set()

    def _generate(self, prepared: Prepared, *, streamer: Any, cancel: threading.Event | None = None) -> list[int]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), bool(cancel and cancel.is_set()), dtype=torch.bool)

        req = prepared.request
        kwargs: dict[str, Any] = {"max_new_tokens": prepared.max_new_tokens, "streamer": streamer,
                                  "attention_mask": torch.ones_like(prepared.input_ids),
                                  "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": self.eos_ids,
                                  "stopping_criteria": StoppingCriteriaList([_Cancelled()])}
        if req.stop_strings():
            kwargs.update(stop_strings=req.stop_strings(), tokenizer=self.tokenizer)
        if req.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=req.temperature, top_p=req.top_p, top_k=None)
        with self._lock, torch.inference_mode():
            if req.seed is not None:
                torch.manual_seed(req.seed)
            out = self.model.generate(prepared.input_ids, **kwargs)
        return out[0, prepared.prompt_tokens:].tolist()

    def _text(self, prepared: Prepared, ids: list[int]) -> tuple[str, bool]:
        """The decoded answer, cut before the first stop sequence; and whether one was found."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in prepared.request.stop_strings()) if i >= 0]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def _finish(self, prepared: Prepared, ids: list[int]) -> tuple[str, str]:
        text, stopped = self._text(prepared, ids)
        ended = stopped or (bool(ids) and ids[-1] in self.eos_ids)
        return text, "stop" if ended or len(ids) < prepared.max_new_tokens else "length"


class _QueueStreamer:
    """transformers' streamer interface (`put`, `end`): the first `put` is the prompt, then one token per step."""

    def __init__(self, out: queue.Queue[Any]) -> None:
        self.out, self.prompt_seen = out, False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.out.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def _safe_prefix(text: str, hold: int) -> str:
    """What can be sent now: not a trailing half character (U+FFFD from a split byte sequence), nor the
    last `hold` characters that might still grow into a stop sequence."""
    text = text.rstrip("\ufffd")
    return text[: len(text) - hold] if hold > 0 else text


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
