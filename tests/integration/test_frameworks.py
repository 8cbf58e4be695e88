"""Agents written with LangChain and LangGraph run on AIOS unchanged but for base_url, api_key and model."""

from __future__ import annotations

from typing import Literal

import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from pydantic import BaseModel

import aios
from deploy.cluster import Cluster


@pytest.fixture(scope="module")
def agent(kernel: aios.Connection) -> aios.Agent:
    return kernel.register("langchain-agent")


@pytest.fixture(scope="module")
def llm(cluster: Cluster, agent: aios.Agent) -> ChatOpenAI:
    # The three lines a user changes: base_url, api_key (an AIOS agent token) and model.
    return ChatOpenAI(base_url=cluster.openai_base_url, api_key=agent.token, model=cluster.served_model_name,
                      temperature=0, max_tokens=120, max_retries=0)


class Weather(BaseModel):
    city: str
    unit: Literal["celsius", "fahrenheit"]
    rainy: bool


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"18 degrees and clear in {city}"


def test_chat_openai_gives_structured_output_and_bound_tool_calls(llm):
    weather = llm.with_structured_output(Weather, method="json_schema").invoke("Describe the weather in Paris.")
    assert isinstance(weather, Weather) and weather.unit in ("celsius", "fahrenheit")
    message = llm.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False).invoke(
        "What is the weather in Paris?")
    assert isinstance(message, AIMessage) and message.tool_calls
    assert message.tool_calls[0]["name"] == "get_weather" and isinstance(message.tool_calls[0]["args"]["city"], str)


def test_a_langgraph_react_agent_completes_a_two_step_tool_loop_with_an_aios_tool(llm, agent):
    @tool
    def lookup_population(city: str) -> str:
        """The population of a city, in millions."""
        return "2.1"

    through_kernel: list[str] = []

    @tool
    def calculator(expression: str) -> str:
        """Evaluates an arithmetic expression, e.g. '2.1 * 2'."""
        try:  # an AIOS tool: a syscall through the kernel, queued like any other
            answer = str(agent.call_tool("calculator", expression=expression)["result"])
        except aios.SyscallError as error:  # the model's expression may not parse: the tool says so
            answer = f"error: {error.message}"
        through_kernel.append(answer)
        return answer

    # Each turn of the loop offers the tool it needs (a 270M model follows a named tool choice reliably).
    steps = [llm.bind_tools([lookup_population], tool_choice="lookup_population", parallel_tool_calls=False),
             llm.bind_tools([calculator], tool_choice="calculator", parallel_tool_calls=False), llm]

    def model(state: MessagesState) -> dict:
        done = sum(isinstance(m, ToolMessage) for m in state["messages"])
        return {"messages": [steps[min(done, 2)].invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", model)
    graph.add_node("tools", ToolNode([lookup_population, calculator]))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition)
    graph.add_edge("tools", "model")
    result = graph.compile().invoke(
        {"messages": [("user", "Look up the population of Paris, then double it with the calculator.")]},
        {"recursion_limit": 10})
    messages = result["messages"]
    tool_results = [m for m in messages if isinstance(m, ToolMessage)]
    assert [m.name for m in tool_results] == ["lookup_population", "calculator"]
    assert isinstance(messages[-1], AIMessage) and not messages[-1].tool_calls and messages[-1].content
    assert through_kernel == [tool_results[1].content]
