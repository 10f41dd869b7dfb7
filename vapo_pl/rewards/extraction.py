"""Find the final answer in a response: string work only, linear time, no math library.

Order (ALGORITHMS.md section 4): the last ``\\boxed{...}`` (or ``\\fbox{...}``) decides if one
exists; otherwise the last "answer is X" / "Answer: X" / "#### X" form. The returned text is
what the verifier parses; nothing here evaluates it.

Bounds that make this safe on any input:
- only the last ``tail_chars`` characters are read (a megabyte of text costs a slice);
- the brace scan stops at ``max_depth`` nesting or ``max_answer_chars`` characters (10,000
  nested braces give "no answer" after ``max_depth`` steps);
- the regexes have no nested quantifiers and bounded repetition, so their cost is bounded by the
  tail's length (a few milliseconds at worst).

Departure from common practice: if the last ``\\boxed`` is malformed (unbalanced, too deep, too
long) the response has no answer, rather than falling back to an earlier ``\\boxed`` or to an
"answer is" sentence. An earlier box is usually an intermediate result, and a truncated final box
is not a final answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TAIL_CHARS = 4000  # a final answer sits at the end; read only this much
MAX_ANSWER_CHARS = 1000  # longer "answers" are not answers (and would be slow to parse)
MAX_DEPTH = 20  # brace nesting inside \boxed{...}; real answers nest a few levels

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANCHOR = re.compile(r"####|\b(?:final\s+)?answer\s*(?:is\s*:?|:|=)", re.IGNORECASE)
# What follows an anchor: a math span, or one whitespace-free token.
_N = MAX_ANSWER_CHARS
_AFTER_ANCHOR = re.compile(
    r"[\s*]{0,20}(?:[a-zA-Z]\s{0,3}=\s{0,3})?"  # markdown bold, "x = " before the value
    rf"(?:\$\$(?P<dd>[^$]{{1,{_N}}})\$\$|\$(?P<d>[^$\n]{{1,{_N}}})\$|\\\((?P<p>[\s\S]{{1,{_N}}}?)\\\)"
    rf"|\\\[(?P<b>[\s\S]{{1,{_N}}}?)\\\]|(?P<tok>[^\s$]{{1,{_N}}})(?![^\s$]))"
)
_TRAILING = " \t\n.,;:!?*"


@dataclass(frozen=True)
class Extracted:
    """The final answer found in a response."""

    text: str  # the answer as written: the box content, or the value after the anchor
    form: str  # "boxed" or "anchor"


def last_boxed(text: str, max_depth: int = MAX_DEPTH, max_answer_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text``; None if there is none or it is malformed."""
    starts = list(_BOXED.finditer(text))
    if not starts:
        return None
    begin = starts[-1].end()
    depth = 1
    end = min(len(text), begin + max_answer_chars + 1)
    for i in range(begin, end):
        c = text[i]
        if c == "\\" and i + 1 < end and text[i + 1] in "{}":
            continue  # \{ and \} are literal braces (sets), not grouping
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
            if depth > max_depth:
                return None
        elif c == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                inner = text[begin:i].strip()
                return inner or None
    return None  # unbalanced, or longer than max_answer_chars


def anchored_answer(text: str, max_answer_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """Value after the last "answer is" / "Answer:" / "####" in ``text``, or None."""
    for anchor in reversed(list(_ANCHOR.finditer(text))):
        m = _AFTER_ANCHOR.match(text, anchor.end())
        if m is None:
            continue
        value = next(v for v in m.group("dd", "d", "p", "b", "tok") if v is not None)
        value = value.strip().rstrip(_TRAILING) if m.group("tok") else value.strip()
        if value and len(value) <= max_answer_chars:
            return value
    return None


def extract_answer(
    response: str,
    *,
    tail_chars: int = TAIL_CHARS,
    max_answer_chars: int = MAX_ANSWER_CHARS,
    max_depth: int = MAX_DEPTH,
    forms: tuple[str, ...] = ("boxed", "anchor"),
) -> Extracted | None:
    """The final answer of ``response`` (see the module docstring for the order and bounds).

    Args:
        response: the decoded response text (any length, any characters).
        tail_chars: only the last ``tail_chars`` characters are searched.
        max_answer_chars: answers longer than this count as absent (an answer after an anchor is
            also capped at ``MAX_ANSWER_CHARS``, the bound compiled into its regex).
        max_depth: brace nesting beyond this inside ``\\boxed{}`` counts as absent.
        forms: which forms to accept, a subset of ("boxed", "anchor").
    """
    if not isinstance(response, str):
        raise ValueError(f"response must be a str, got {type(response).__name__}")
    tail = response[-tail_chars:]
    if "boxed" in forms and _BOXED.search(tail):
        inner = last_boxed(tail, max_depth=max_depth, max_answer_chars=max_answer_chars)
        return Extracted(inner, "boxed") if inner is not None else None
    if "anchor" in forms:
        value = anchored_answer(tail, max_answer_chars=max_answer_chars)
        if value is not None:
            return Extracted(value, "anchor")
    return None


_SPACES = re.compile(r"\s+")
_NOISE = re.compile(r"\\left|\\right|\\[,!;: ]|\\displaystyle|\$")
_FRAC = re.compile(r"\\[dt]frac")


def normalize_answer(text: str) -> str:
    """A canonical string for exact-match voting: spacing, ``\\left``/``\\right``, ``\\dfrac``,
    dollar signs and a trailing period removed. Cheap; equivalence beyond this is the verifier's."""
    text = _FRAC.sub(r"\\frac", _NOISE.sub("", text))
    return _SPACES.sub("", text).rstrip(".")
