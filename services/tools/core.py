"""The tool registry: named tools with a JSON Schema for their arguments.

Arguments are validated against the schema before a tool runs, so a tool's
function only ever sees arguments of the shape it declared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import jsonschema

from services.errors import InvalidArgument, NotFound, require

ToolFunction = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    function: ToolFunction


class ToolRegistry:
    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}
        self._validators: dict[str, jsonschema.protocols.Validator] = {}

    def register(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is already registered")
        validator_class = jsonschema.validators.validator_for(tool.parameters, default=jsonschema.Draft202012Validator)
        validator_class.check_schema(tool.parameters)
        self._tools[tool.name] = tool
        self._validators[tool.name] = validator_class(tool.parameters)

    def list(self) -> list[Tool]:
        return [self._tools[name] for name in sorted(self._tools)]

    def call(self, name: str, arguments_json: str) -> Any:
        """Validates the JSON arguments and runs the tool; returns its JSON-able result."""
        require(bool(name), "tool name is required")
        tool = self._tools.get(name)
        if tool is None:
            known = ", ".join(sorted(self._tools))
            raise NotFound(f"no tool named {name!r}; available tools: {known}")
        try:
            arguments = json.loads(arguments_json) if arguments_json.strip() else {}
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"arguments for {name!r} are not valid JSON: {exc}") from None
        error = jsonschema.exceptions.best_match(self._validators[name].iter_errors(arguments))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(arguments)"
            raise InvalidArgument(f"arguments for {name!r} do not match its schema at {where}: {error.message}")
        return tool.function(arguments)
