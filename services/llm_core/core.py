"""The LLM core as a plain object: request -> tokens -> a sequence in the batch engine."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Callable

from services.errors import InvalidArgument
from services.llm_core.engine import BatchEngine, Event, Sequence
from services.llm_core.model import LlamaModel
from services.llm_core.prompt import PromptFormat
from services.llm_core.sampling import SamplingConfig


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    messages: list[tuple[str, str]]
    sampling: SamplingConfig
    request_id: str = ""


class LLMCore:
    def __init__(self, model: LlamaModel, engine: BatchEngine, prompt_format: PromptFormat) -> None:
        self.model = model
        self.engine = engine
        self.format = prompt_format
        self._ids = itertools.count(1)

    def tokens_for(self, prompt: str, messages: list[tuple[str, str]]) -> list[int]:
        if bool(prompt) == bool(messages):
            raise InvalidArgument("set exactly one of prompt or messages")
        if prompt:
            return self.model.tokenize(prompt, add_bos=True, special=True)
        tokens = self.model.tokenize("", add_bos=True, special=False)
        for segment in self.format.render(messages):
            tokens += self.model.tokenize(segment.text, add_bos=False, special=segment.special)
        return tokens

    def start(self, request: GenerationRequest, emit: Callable[[Event], None]) -> Sequence:
        """Tokenizes, checks limits and queues the sequence; events arrive through `emit`."""
        tokens = self.tokens_for(request.prompt, request.messages)
        sampling = request.sampling
        if request.messages:
            # The model must stop where it would start writing the next (user's) turn.
            sampling = dataclasses.replace(sampling, stop=sampling.stop + self.format.stop)
        seq = Sequence(request.request_id or f"gen-{next(self._ids)}", tokens, sampling, emit)
        self.engine.submit(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        self.engine.cancel(seq)
