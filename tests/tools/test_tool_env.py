"""``ToolEnvironment``: calls read in Qwen2.5's ``<tool_call>`` JSON or a configured tag, run in the real sandbox,
answered in the chat template's tool-response format; a turn without a call ends the episode; bad calls get error
observations."""

from __future__ import annotations

import pytest

from vapo_pl.envs import EpisodeLimits, ToolEnvironment, parse_tool_calls, tool_response_text
from vapo_pl.tiny import build_char_tokenizer
from vapo_pl.tools.sandbox import Sandbox, SandboxLimits

# Qwen2.5's chat template, reduced to the roles used here; the tool message is rendered exactly as Qwen2.5-Instruct's
# tokenizer_config.json renders it (a user turn holding <tool_response>...</tool_response>).
QWEN_LIKE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxLimits(wall_s=3.0, cpu_s=3))


def test_parse_qwen_calls_tags_and_bad_json():
    text = ('first <tool_call>{"name": "calculator", "arguments": {"expression": "3*4"}}</tool_call> then '
            '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}</tool_call>'
            '<tool_call>{"name": calc}</tool_call><tool_call>[1]</tool_call>')
    calls = parse_tool_calls(text)
    assert calls[0] == ("calculator", {"expression": "3*4"})
    assert calls[1] == ("python", {"code": "print(1)"})
    assert calls[2].startswith("the tool call is not JSON") and calls[3].startswith("a tool call needs")
    assert parse_tool_calls("12+<calc> 7*8 </calc>=", tag="calc") == [("calc", {"input": "7*8"})]
    assert parse_tool_calls("no call here") == []


def test_tool_response_follows_the_template_or_falls_back():
    tok = build_char_tokenizer()
    assert tool_response_text(tok, "42") == "\n<tool_response>\n42\n</tool_response>\nA:"  # no tool role: fallback
    tok.chat_template = QWEN_LIKE
    assert tool_response_text(tok, "42") == ("<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n"
                                             "<|im_start|>assistant\n")


def test_turns_run_tools_and_a_turn_without_a_call_ends(sandbox):
    tok = build_char_tokenizer()
    tok.chat_template = QWEN_LIKE
    env = ToolEnvironment(tok, sandbox)
    assert env.reset(None, "Q") == "Q"
    r = env.step([1, 2], '<tool_call>{"name": "calculator", "arguments": {"expression": "17*23"}}</tool_call>')
    assert not r.done and "\n391\n" in r.observation and r.info["tool_calls"] == 1 and r.info["tool_errors"] == 0
    r = env.step([3], '<tool_call>{"name": "python", "arguments": {"code": "print(sum(range(10)))"}}</tool_call>'
                      '<tool_call>{"name": "search", "arguments": {}}</tool_call>')
    assert "\n45\nerror: no tool named 'search'" in r.observation and r.info["tool_errors"] == 1
    r = env.step([4], '<tool_call>{"name": "python", "arguments": {"code": "while True: pass"}}</tool_call>')
    assert "error: timed out" in r.observation and r.info["tool_errors"] == 1
    r = env.step([5], "The answer is 391.")
    assert r.done and r.observation is None


def test_tag_calls_use_the_calculator(sandbox):
    env = ToolEnvironment(build_char_tokenizer(), sandbox, tag="calc")
    r = env.step([1], "<calc>12*12</calc>")
    assert "\n144\n" in r.observation


def test_episode_limits_are_checked():
    assert EpisodeLimits(max_turns=3).max_turns == 3
    with pytest.raises(ValueError, match="data.episode.max_turns must be an integer >= 1"):
        EpisodeLimits(max_turns=0)
