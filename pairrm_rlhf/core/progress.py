"""When to show a progress bar: one policy for every long job (scorer, RLHFlow, eval, bench, labeler, PPO).

Like sentence-transformers: `show_progress_bar=None` means "decide for me". A bar is shown when the job has more
than one step (batch, chunk, task) and someone is watching: stderr is a terminal, or the caller's logger is at
INFO or below (a CLI run, a notebook with logging configured). An explicit True/False always wins.
"""

from __future__ import annotations

import logging
import sys


def progress_enabled(show_progress_bar: bool | None, steps: int, logger: logging.Logger | None = None) -> bool:
    """Whether to show a bar for a job of `steps` steps.

    Args:
        show_progress_bar: True/False forces the answer; None applies the policy.
        steps: how many updates the bar would get (batches, chunks, tasks).
        logger: the caller's logger (its effective level counts); default: the `pairrm_rlhf` logger.

    Returns:
        True when the bar should be shown.

    Example:
        >>> progress_enabled(None, 1)  # a single batch never shows a bar
        False
    """
    if show_progress_bar is not None:
        return bool(show_progress_bar)
    if steps <= 1:
        return False
    logger = logger or logging.getLogger("pairrm_rlhf")
    return _stderr_is_terminal() or logger.getEffectiveLevel() <= logging.INFO


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
