"""Tool calling as an environment: the policy writes a call, the environment runs it in the sandbox and answers with
the result in the chat template's tool-response format; a turn without a call ends the episode.

Calls are read in Qwen2.5's format, ``<tool_call>{"name": "calculator", "arguments": {"expression": "3*4"}}
</tool_call>``, or, with ``tag="calc"``, as ``<calc>3*4</calc>`` (the argument is the tag's text, for small models
that were never taught JSON). The answer is rendered by the tokenizer's chat template (a ``tool`` message after the
assistant turn, then the generation prompt) when the template knows the ``tool`` role, else as
``<tool_response>...</tool_response>`` followed by the generation prompt's text.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from vapo_pl.envs.base import Environment, StepResult
from vapo_pl.prompts import PromptRecord
from vapo_pl.tools.sandbox import Sandbox, SandboxLimits, ToolResult

_QWEN_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str, tag: str | None = None) -> list[tuple[str, dict[str, Any]] | str]:
    """The calls in one turn, in order: ``(name, arguments)``, or an error string for a call that cannot be read
    (bad JSON, no name). With ``tag``, ``<tag>...</tag>`` is a call of that tool with ``{"input": text}``."""
    if tag is not None:
        return [(tag, {"input": m.strip()}) for m in re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>",
                                                                text, re.DOTALL)]
    calls: list[tuple[str, dict[str, Any]] | str] = []
    for body in _QWEN_CALL.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(f"the tool call is not JSON ({e.msg} at character {e.pos})")
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            calls.append('a tool call needs {"name": ..., "arguments": {...}}')
            continue
        args = call.get("arguments", {})
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = {"input": args}
        calls.append((call["name"], args if isinstance(args, dict) else {"input": args}))
    return calls


def tool_response_text(tokenizer: Any, content: str) -> str:
    """The text between the end of an assistant turn and the start of the next one that answers with ``content``,
    as the tokenizer's chat template writes a ``tool`` message (Qwen2.5: ``<|im_start|>user\n<tool_response>\n...
    </tool_response><|im_end|>\n<|im_start|>assistant\n``, once the assistant turn's own ``<|im_end|>`` is there).
    A template that does not know the ``tool`` role (it would render it as another role) gets
    ``<tool_response>...</tool_response>`` and its generation prompt; no template, the bare tags."""
    base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return f"\n<tool_response>\n{content}\n</tool_response>\n"
    before = tokenizer.apply_chat_template(base, tokenize=False)
    if "tool" in template:
        after = tokenizer.apply_chat_template([*base, {"role": "tool", "content": content}], tokenize=False,
                                              add_generation_prompt=True)
        if after.startswith(before) and content in after[len(before):]:
            return after[len(before):]
    prompt = tokenizer.apply_chat_template(base, tokenize=False, add_generation_prompt=True)[len(before):]
    return f"\n<tool_response>\n{content}\n</tool_response>\n{prompt}"


class ToolEnvironment(Environment):
    """Tools by name (default: ``calculator`` and ``python``), run in a ``Sandbox``; each turn's calls are run in
    order and answered together. A call of an unknown tool, or with missing arguments, is answered with an error
    observation (counted in ``tool_errors``), as is a call whose run failed."""

    metrics = ("tool_calls", "tool_errors", "tool_seconds")

    def __init__(self, tokenizer: Any = None, sandbox: Sandbox | None = None, tag: str | None = None,
                 tools: list[str] | dict[str, Callable[[Sandbox, dict[str, Any]], ToolResult]] | None = None,
                 max_calls_per_turn: int = 4, limits: dict[str, Any] | None = None) -> None:
        """``tools``: names of the built-in tools (``calculator``, ``python``; default both) or a mapping of names
        to functions ``(sandbox, arguments) -> ToolResult``. ``tag``: read calls as ``<tag>...</tag>`` (a call of
        the calculator, unless a tool has that name). ``limits``: ``SandboxLimits`` fields for the shared sandbox
        (when ``sandbox`` is not given)."""
        self.tokenizer, self.tag = tokenizer, tag
        self.sandbox = sandbox if sandbox is not None else shared_sandbox(**(limits or {}))
        if tools is None or isinstance(tools, (list, tuple)):
            names = list(tools) if tools is not None else list(BUILTIN_TOOLS)
            unknown = [t for t in names if t not in BUILTIN_TOOLS]
            if unknown:
                raise ValueError(f"ToolEnvironment.tools: no built-in tool {unknown[0]!r} "
                                 f"(built-in: {', '.join(BUILTIN_TOOLS)})")
            tools = {t: BUILTIN_TOOLS[t] for t in names}
        self.tools = dict(tools)
        if tag is not None and tag not in self.tools:
            self.tools[tag] = _calculator
        if max_calls_per_turn < 1:
            raise ValueError(f"ToolEnvironment.max_calls_per_turn must be >= 1, got {max_calls_per_turn}")
        self.max_calls_per_turn = max_calls_per_turn

    def reset(self, record: PromptRecord, prompt: str) -> str:
        return prompt

    def step(self, turn_ids: list[int], turn_text: str) -> StepResult:
        calls = parse_tool_calls(turn_text, self.tag)
        if not calls:
            return StepResult(observation=None, done=True, info={"tool_calls": 0, "tool_errors": 0})
        answers, errors, seconds = [], 0, 0.0
        for call in calls[: self.max_calls_per_turn]:
            if isinstance(call, str):
                answers.append(f"error: {call}")
                errors += 1
                continue
            name, args = call
            tool = self.tools.get(name)
            if tool is None:
                answers.append(f"error: no tool named {name!r} (tools: {', '.join(sorted(self.tools))})")
                errors += 1
                continue
            start = time.perf_counter()
            try:
                result = tool(self.sandbox, args)
            except (KeyError, TypeError, ValueError) as e:
                answers.append(f"error: bad arguments for {name}: {e}")
                errors += 1
                continue
            seconds += time.perf_counter() - start
            errors += not result.ok
            answers.append(result.observation())
        if len(calls) > self.max_calls_per_turn:
            answers.append(f"error: at most {self.max_calls_per_turn} tool calls per turn")
            errors += 1
        text = tool_response_text(self.tokenizer, "\n".join(answers))
        return StepResult(observation=text, info={"tool_calls": len(calls), "tool_errors": errors,
                                                  "tool_seconds": seconds})


def _calculator(sandbox: Sandbox, args: dict[str, Any]) -> ToolResult:
    expression = args.get("expression", args.get("input"))
    if not isinstance(expression, str):
        raise TypeError('needs "expression": a string')
    return sandbox.calculate(expression)


def _python(sandbox: Sandbox, args: dict[str, Any]) -> ToolResult:
    code = args.get("code", args.get("input"))
    if not isinstance(code, str):
        raise TypeError('needs "code": a string')
    return sandbox.run_python(code)


BUILTIN_TOOLS: dict[str, Callable[[Sandbox, dict[str, Any]], ToolResult]] = {"calculator": _calculator,
                                                                             "python": _python}
_SANDBOXES: dict[SandboxLimits, Sandbox] = {}
_SANDBOX_LOCK = threading.Lock()


def shared_sandbox(**limits: Any) -> Sandbox:
    """One ``Sandbox`` per set of limits in this process (episodes share it; every call is its own process)."""
    key = SandboxLimits(**limits)
    with _SANDBOX_LOCK:
        if key not in _SANDBOXES:
            _SANDBOXES[key] = Sandbox(key)
        return _SANDBOXES[key]
