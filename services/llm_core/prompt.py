"""Prompt formatting owned by the kernel: the default model ships no chat template.

A format turns chat messages into text segments plus the stop strings that mark
the model starting the next turn by itself. Message content is tokenized with
special-token parsing off, so text such as "<end_of_turn>" inside a message
cannot forge a control token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from services.errors import InvalidArgument


@dataclass(frozen=True)
class Segment:
    text: str
    # True for template text whose control-token spellings must become control tokens.
    special: bool


ROLES = ("system", "user", "assistant", "tool")
# What a tool's result looks like in a prompt: the model reads it as the answer to its call.
TOOL_RESULT = "Tool result: "
Messages = list[tuple[str, str]]


def split_turns(messages: Messages) -> tuple[str, Messages]:
    """Checks roles and order; returns the system text and the user/assistant turns."""
    if not messages:
        raise InvalidArgument("messages must contain at least one message")
    system: list[str] = []
    turns: Messages = []
    for index, (role, content) in enumerate(messages):
        if role not in ROLES:
            raise InvalidArgument(f"messages[{index}].role is {role!r}; use one of {', '.join(ROLES)}")
        if role == "system":
            if turns:
                raise InvalidArgument(f"messages[{index}]: a system message must come before the other turns")
            system.append(content)
        else:
            turns.append((role, content))
    if not turns or turns[-1][0] not in ("user", "tool"):
        raise InvalidArgument("the last message must have role 'user' or 'tool' (the model answers it)")
    return "\n\n".join(system), turns


class PromptFormat(Protocol):
    name: str
    # Text the model writes when it starts a turn that is not its own.
    stop: tuple[str, ...]

    def render(self, messages: Messages) -> list[Segment]: ...


class TranscriptFormat:
    """A Question/Answer transcript: what a base (not instruction-tuned) model continues best.

    Measured on the bundled Gemma 3 270M base model, which answers a "Question: ...
    Answer:" prompt sensibly but only echoes or repeats inside Gemma turn markup.
    """

    name = "transcript"
    stop = ("\nQuestion:", "\nAnswer:")

    def render(self, messages: Messages) -> list[Segment]:
        system, turns = split_turns(messages)
        segments = [Segment(f"{system}\n\n", False)] if system else []
        for role, content in turns:
            label = {"user": "Question: ", "assistant": "Answer: ", "tool": TOOL_RESULT}[role]
            segments.append(Segment(f"{label}{content.strip()}\n", False))
        segments.append(Segment("Answer:", False))
        return segments


class GemmaTurnFormat:
    """<start_of_turn>user\\n...<end_of_turn>\\n ... <start_of_turn>model\\n, for Gemma -it models.

    Gemma has no system role: system text is prepended to the first user turn.
    """

    name = "gemma"
    stop = ("<start_of_turn>",)

    def render(self, messages: Messages) -> list[Segment]:
        system, turns = split_turns(messages)
        segments: list[Segment] = []
        for index, (role, content) in enumerate(turns):
            if role == "tool":  # Gemma has no tool role: a result comes back as the user's turn
                role, content = "user", TOOL_RESULT + content
            if index == 0 and system:
                content = f"{system}\n\n{content}"
            segments.append(Segment(f"<start_of_turn>{'model' if role == 'assistant' else 'user'}\n", True))
            segments.append(Segment(content, False))
            segments.append(Segment("<end_of_turn>\n", True))
        segments.append(Segment("<start_of_turn>model\n", True))
        return segments


FORMATS: dict[str, type] = {TranscriptFormat.name: TranscriptFormat, GemmaTurnFormat.name: GemmaTurnFormat}
