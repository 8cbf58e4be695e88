"""ToolRegistry and the built-in tools."""

import json

import pytest

from services.errors import InvalidArgument, NotFound
from services.tools.builtin import BUILTIN_TOOLS, evaluate
from services.tools.core import ToolRegistry


@pytest.fixture
def registry():
    registry = ToolRegistry()
    for tool in BUILTIN_TOOLS:
        registry.register(tool)
    return registry


@pytest.mark.parametrize(
    "expression, value",
    [("(2+3)*7", 35), ("2**10", 1024), ("7 // 2", 3), ("-3 + 10 % 4", -1), ("sqrt(16) + abs(-2)", 6.0), ("pi", 3.141592653589793)],
)
def test_calculator_evaluates_arithmetic(expression, value):
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('true')", "open('/etc/passwd')", "x + 1", "1/0", "9**99999", "(lambda: 1)()", "1 +"],
)
def test_calculator_refuses_anything_but_arithmetic(expression):
    with pytest.raises(InvalidArgument):
        evaluate(expression)


def test_registry_validates_arguments_against_the_schema(registry):
    assert registry.call("calculator", json.dumps({"expression": "1+1"}))["result"] == 2
    with pytest.raises(InvalidArgument, match="required"):
        registry.call("calculator", "{}")
    with pytest.raises(InvalidArgument, match="Additional properties"):
        registry.call("calculator", json.dumps({"expression": "1", "mode": "x"}))
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        registry.call("calculator", "{expression:")
    with pytest.raises(NotFound, match="calculator, clock"):
        registry.call("weather", "{}")


def test_clock_reports_the_requested_timezone(registry):
    result = registry.call("clock", json.dumps({"timezone": "Asia/Tokyo"}))
    assert result["timezone"] == "Asia/Tokyo" and result["iso"].endswith("+09:00")
    with pytest.raises(InvalidArgument, match="IANA"):
        registry.call("clock", json.dumps({"timezone": "Mars/Olympus"}))


def test_a_tool_name_can_be_registered_once(registry):
    with pytest.raises(ValueError):
        registry.register(BUILTIN_TOOLS[0])
