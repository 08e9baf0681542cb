"""Chat templates rendered with a bound on their work.

A chat template is code that comes with a checkpoint. transformers runs it in jinja's sandbox, which limits what it
may touch but not how long it runs: `{% for i in range(100000) %}{% for j in range(100000) %}` keeps a process busy
for hours. `render_chat` counts the lines the compiled template executes (jinja compiles a template to Python whose
code is named `<template>`; a per-thread trace function counts only those frames) and stops it past
`MAX_TEMPLATE_STEPS` with a one-line ValueError. A real template takes a few steps per message: the bundled
Qwen-style one 4,020 for a 1,001-message chat; the budget is spent by the nested loops above in 0.2 s on the shared
2-core CI machine (`tests/test_labeling_data.py::test_chat_template_that_never_ends_is_stopped`). The counting
costs 0.19 ms per one-turn prompt against 0.07 ms unbounded (2,000 prompts, the bundled template, same machine).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

MAX_TEMPLATE_STEPS = 1_000_000


class TemplateBudgetError(ValueError):
    """A chat template that did not finish within its step budget."""


def render_chat(tokenizer: Any, messages: Sequence[dict], *, max_steps: int = MAX_TEMPLATE_STEPS, **kwargs: Any) -> str:
    """`tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)`, stopped with a `TemplateBudgetError`
    when the template executes more than `max_steps` lines (see the module docstring)."""
    steps = 0

    def count(frame: Any, event: str, arg: Any) -> Any:
        nonlocal steps
        if event == "line":
            steps += 1
            if steps > max_steps:
                raise TemplateBudgetError(
                    f"the chat template of {getattr(tokenizer, 'name_or_path', 'the tokenizer') or 'the tokenizer'} "
                    f"did not finish within {max_steps:,} steps (a template that loops without end?)")
        return count

    def enter(frame: Any, event: str, arg: Any) -> Any:
        return count if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(enter)
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, **kwargs)
    finally:
        sys.settrace(previous)
