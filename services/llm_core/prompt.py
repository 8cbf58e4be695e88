"""Prompt formatting owned by the kernel: the default model ships no chat template.

Turns are rendered in Gemma's turn format. Message content is tokenized with
special-token parsing off, so text such as "<end_of_turn>" inside a message
cannot forge a turn boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.errors import InvalidArgument


@dataclass(frozen=True)
class Segment:
    text: str
    # True for template text whose control-token spellings must become control tokens.
    special: bool


ROLES = ("system", "user", "assistant")


class GemmaTurnFormat:
    """<start_of_turn>user\\n...<end_of_turn>\\n ... <start_of_turn>model\\n

    Gemma has no system role: system text is prepended to the first user turn.
    """

    def render(self, messages: list[tuple[str, str]]) -> list[Segment]:
        if not messages:
            raise InvalidArgument("messages must contain at least one message")
        system: list[str] = []
        turns: list[tuple[str, str]] = []
        for index, (role, content) in enumerate(messages):
            if role not in ROLES:
                raise InvalidArgument(f"messages[{index}].role is {role!r}; use one of {', '.join(ROLES)}")
            if role == "system":
                if turns:
                    raise InvalidArgument(f"messages[{index}]: a system message must come before the other turns")
                system.append(content)
            else:
                turns.append((role, content))
        if not turns or turns[-1][0] != "user":
            raise InvalidArgument("the last message must have role 'user' (the model answers it)")
        segments: list[Segment] = []
        for index, (role, content) in enumerate(turns):
            if index == 0 and system and role == "user":
                content = "\n\n".join([*system, content])
            segments.append(Segment(f"<start_of_turn>{'model' if role == 'assistant' else 'user'}\n", True))
            segments.append(Segment(content, False))
            segments.append(Segment("<end_of_turn>\n", True))
        segments.append(Segment("<start_of_turn>model\n", True))
        return segments
