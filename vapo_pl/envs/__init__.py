"""Multi-turn environments (``Environment``) and the tool-calling one (``ToolEnvironment``)."""

from vapo_pl.envs.base import Environment, EpisodeLimits, StepResult
from vapo_pl.envs.tools import ToolEnvironment, parse_tool_calls, tool_response_text

__all__ = ["Environment", "EpisodeLimits", "StepResult", "ToolEnvironment", "parse_tool_calls", "tool_response_text"]
