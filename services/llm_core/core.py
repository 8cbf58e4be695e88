"""The LLM core as a plain object: requests -> sequences in the batch engine, and back again after a preemption."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Callable

from services.errors import InvalidArgument, ResourceExhausted
from services.llm_core.engine import BatchEngine, Event, Sequence
from services.llm_core.model import LlamaModel
from services.llm_core.prompt import PromptFormat
from services.llm_core.sampling import SamplingConfig
from services.llm_core.snapshot import KvSnapshotStore

SWAP_OUT_TIMEOUT_S = 30.0  # how long Preempt(swap_out) waits for a parked sequence's snapshot to be written


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    messages: list[tuple[str, str]]
    sampling: SamplingConfig
    request_id: str = ""
    agent_id: str = ""
    replay: tuple[int, ...] = ()  # tokens already delivered by a core that died (GenerateRequest.replay_token_ids)
    replay_in_batch: bool = False  # GenerateRequest.replay_in_batch


class LLMCore:
    def __init__(
        self, model: LlamaModel, engine: BatchEngine, prompt_format: PromptFormat, snapshots: KvSnapshotStore
    ) -> None:
        self.model = model
        self.engine = engine
        self.format = prompt_format
        self.snapshots = snapshots
        self._ids = itertools.count(1)

    def check_length(self, request: GenerationRequest) -> None:
        """Refuses, before any tokenizing, a prompt too long in characters to fit the context in tokens."""
        chars = len(request.prompt) + sum(len(content) for _, content in request.messages)
        limit = self.engine.config.max_sequence_tokens * self.model.longest_token_chars
        if chars > limit:
            raise ResourceExhausted(
                f"the prompt is {chars} characters; this LLM core holds {self.engine.config.max_sequence_tokens} "
                f"tokens per sequence, which no prompt over {limit} characters fits. Shorten the prompt."
            )

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
        """Checks sizes, tokenizes, checks limits and queues the sequence; events arrive through `emit`."""
        self.check_length(request)
        tokens = self.tokens_for(request.prompt, request.messages)
        sampling = request.sampling
        if request.messages:
            # The model must stop where it would start writing the next (user's) turn.
            # The format's stops the caller did not ask for itself: reaching one is the model ending its turn.
            turn_end = tuple(s for s in self.format.stop if s not in sampling.stop)
            sampling = dataclasses.replace(sampling, stop=sampling.stop + self.format.stop, turn_end=turn_end)
        if any(not 0 <= t < self.model.n_vocab for t in request.replay) or len(request.replay) > sampling.max_tokens:
            raise InvalidArgument(f"replay_token_ids must be at most max_tokens ids of this model's vocabulary "
                                  f"(0..{self.model.n_vocab - 1})")
        seq = Sequence(request.request_id or f"gen-{next(self._ids)}", request.agent_id, tokens, sampling, emit,
                       constraint=self.model.constraint(sampling.grammar))
        seq.replay.extend(request.replay)
        seq.replay_in_batch = request.replay_in_batch
        self.engine.submit(seq)
        return seq

    def resume(self, request_id: str, agent_id: str, emit: Callable[[Event], None]) -> Sequence:
        """Continues a preempted generation: in place if still resident, else from its snapshot.

        Blocks on Redis when the snapshot must be fetched; call it off the event loop.
        """
        if not request_id:
            raise InvalidArgument("resume needs the syscall_id of the preempted generation")
        seq = self.engine.resume(request_id, agent_id, emit)
        if seq is not None:
            return seq
        snapshot = self.snapshots.take(request_id, agent_id)
        seq = self.engine.restored(snapshot, emit)
        self.engine.submit(seq)
        self.snapshots.forget(request_id)  # consumed; a later preemption writes a fresh one
        return seq

    def preempt(self, request_id: str, swap_out: bool) -> bool:
        """Switches a decoding generation out; with `swap_out`, also writes out one already parked here (it moves to
        another core). Blocks until that write is done; call it off the event loop."""
        if self.engine.preempt(request_id, swap_out):
            return True
        if not swap_out:
            return False
        written = self.engine.swap_out_parked(request_id)
        if written is None:  # not parked here; if it was written out lately, that write is done once this returns
            self.snapshots.flush()
            return False
        return written.result(timeout=SWAP_OUT_TIMEOUT_S)

    def discard(self, request_id: str, agent_id: str) -> bool:
        """Forgets a preempted generation wherever it is (resident slot or snapshot). Blocks on Redis."""
        if self.engine.discard(request_id, agent_id):
            return True
        self.snapshots.take(request_id, agent_id)  # ownership check; NOT_FOUND when already gone
        return self.snapshots.forget(request_id)

    def reset(self, keep: set[str]) -> tuple[int, int]:
        """Forgets every parked generation and every snapshot but those of the syscalls in `keep` (a new kernel
        starts); returns how many of each. Blocks on Redis."""
        return self.engine.discard_all_parked(keep), self.snapshots.forget_all(keep)

    def cancel(self, seq: Sequence) -> None:
        self.engine.cancel(seq)
