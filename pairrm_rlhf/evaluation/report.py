"""What `pairrm-rlhf eval` leaves behind: per-example predictions, the tables, two plots and an optional Hub push.

Files in the output folder:

- `predictions.jsonl`: one line per example: `index`, `subset`, the texts (`prompt`, `chosen`, `rejected`: a
  response, or the list of them for best-of-n; MT-bench rows hold the two conversations), `label` (`chosen`: the
  data prefers the `chosen` response; `tie`), `prediction` (the judge's call: `chosen`, `rejected`, `tie` (only with
  `ties="margin"`), null when unscorable), `tie`, `logits` (z of every chosen-vs-rejected pair), `p_chosen` (the
  judge's probability that the chosen response wins its weakest pair; null when unscorable) and `correct` (1/0,
  null when not counted).
- `results.md` and `results.json`: the agreement table (and the section table when there is one).
- `calibration.png`: predicted P(chosen) against the observed agreement, per probability bin, with the counts.
- `subsets.png`: agreement per subset (or section/group) with its bootstrap interval.
- `README.md`: a dataset card (model, data, settings, the tables), pushed with the rest by `push_results`.

The plots need matplotlib (`pip install pairrm-rlhf[plots]`); without it they are skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.aggregation import probability
from .agreement import SUMMARY_ROWS, Example, SubsetResult, escape_markdown

logger = logging.getLogger(__name__)


def example_probability(z: np.ndarray | None, orders: str = "both") -> float | None:
    """P(chosen wins) for one example: of its weakest pair (every pair must be won), from the two-order logit
    (`aggregation.probability`, T=1) or the single-order logit (sigmoid)."""
    if z is None or len(z) == 0:
        return None
    weakest = float(np.min(z))
    if orders == "both":
        return float(probability(np.array([weakest]))[0])
    return 1.0 / (1.0 + math.exp(-weakest)) if weakest > -700 else 0.0


def prediction_records(
    examples: Sequence[Example],
    logits: Sequence[np.ndarray | None],
    correct: Sequence[float | None],
    orders: str = "both",
    ties: str = "skip",
    tie_margin: float = 0.0,
) -> list[dict[str, Any]]:
    """One JSON-ready record per example, with its texts, so a wrong call can be read (see the module docstring)."""
    return [
        {
            "index": k,
            "subset": ex.subset,
            "prompt": ex.prompt,
            "chosen": _one(ex.chosen),
            "rejected": _one(ex.rejected),
            "label": "tie" if ex.tie else "chosen",
            "prediction": prediction(z, ties, tie_margin),
            "tie": ex.tie,
            "logits": None if z is None else [float(v) for v in z],
            "p_chosen": example_probability(z, orders),
            "correct": c,
        }
        for k, (ex, z, c) in enumerate(zip(examples, logits, correct))
    ]


def prediction(z: np.ndarray | None, ties: str = "skip", tie_margin: float = 0.0) -> str | None:
    """The judge's call from an example's logits, by the rule `correctness` counts: `chosen` when every pair's z is
    above the margin (0 unless `ties="margin"`), `tie` when every |z| is within it (`ties="margin"` only), else
    `rejected`; None when the example could not be scored."""
    if z is None or len(z) == 0:
        return None
    margin = tie_margin if ties == "margin" else 0.0
    if np.all(z > margin):
        return "chosen"
    return "tie" if ties == "margin" and np.all(np.abs(z) <= margin) else "rejected"


def _one(responses: list[Any]) -> Any:
    return responses[0] if len(responses) == 1 else list(responses)


def calibration_bins(records: Sequence[dict], bins: int = 10) -> list[dict[str, float]]:
    """Predicted P(chosen) against observed agreement in `bins` equal-width bins over [0, 1] (empty bins left out).

    Returns:
        [{"low", "high", "n", "predicted" (mean p in the bin), "observed" (mean correct)}].

    Example:
        >>> rows = [{"p_chosen": 0.95, "correct": 1.0}, {"p_chosen": 0.91, "correct": 0.0}]
        >>> calibration_bins(rows, bins=10)[0]["observed"]
        0.5
    """
    counted = [(r["p_chosen"], r["correct"]) for r in records if r["p_chosen"] is not None and r["correct"] is not None]
    out = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = [(p, c) for p, c in counted if low <= p < high or (b == bins - 1 and p == 1.0)]
        if inside:
            out.append(
                {
                    "low": low,
                    "high": high,
                    "n": len(inside),
                    "predicted": float(np.mean([p for p, _ in inside])),
                    "observed": float(np.mean([c for _, c in inside])),
                }
            )
    return out


def write_results(
    output_dir: str | Path,
    records: Sequence[dict],
    results: Sequence[SubsetResult],
    tables_md: str,
    summary: dict[str, Any],
) -> dict[str, Path]:
    """Write predictions.jsonl, results.md and results.json into `output_dir`; return the paths by name."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "predictions": folder / "predictions.jsonl",
        "table": folder / "results.md",
        "json": folder / "results.json",
    }
    with paths["predictions"].open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    paths["table"].write_text(tables_md + "\n")
    paths["json"].write_text(
        json.dumps(
            {**summary, "results": [r.__dict__ for r in results], "calibration": calibration_bins(records)}, indent=2
        )
    )
    return paths


def write_plots(
    output_dir: str | Path, records: Sequence[dict], results: Sequence[SubsetResult], title: str = ""
) -> dict[str, Path]:
    """calibration.png and subsets.png in `output_dir` ({} with a warning when matplotlib is missing)."""
    try:
        figures = {"calibration": calibration_figure(records, title), "subsets": subsets_figure(results, title)}
    except ImportError:
        logger.warning("matplotlib is not installed (pip install pairrm-rlhf[plots]): no plots written")
        return {}
    paths = {}
    for name, fig in figures.items():
        paths[name] = Path(output_dir) / f"{name}.png"
        fig.savefig(paths[name], dpi=100, bbox_inches="tight")
    return paths


def calibration_figure(records: Sequence[dict], title: str = "") -> Any:
    """Predicted P(chosen) against observed agreement per bin; each bin's count is written under the plot area at
    the bin's centre (labels at the points collided when two bins' means were close), the legend below the axes."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    bins = calibration_bins(records)
    fig = Figure(figsize=(5.5, 5.8))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    if bins:
        ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], marker="o", label="judge")
        for b in bins:
            ax.text(
                (b["low"] + b["high"]) / 2,
                0.01,
                str(b["n"]),
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=7,
                color="dimgray",
            )
    ax.set(
        xlim=(-0.02, 1.02),
        ylim=(-0.12, 1.06),
        xlabel="predicted P(chosen)  (grey: examples per bin)",
        ylabel="observed agreement",
    )
    ax.set_title(_wrap(f"Calibration{': ' + title if title else ''}"), fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, frameon=False)
    return fig


def subsets_figure(results: Sequence[SubsetResult], title: str = "") -> Any:
    """Agreement per row of `results` (subsets, sections or groups, then the summary rows) with its interval; the
    value is part of each row's label, a single row keeps a thin bar."""
    from matplotlib.figure import Figure

    rows = [r for r in results if r.n]
    fig = Figure(figsize=(7, 0.4 * len(rows) + 1.6))
    ax = fig.subplots()
    y = np.arange(len(rows))
    values = [r.agreement for r in rows]
    errors = None
    if any(r.low is not None for r in rows):
        errors = np.array(
            [
                [r.agreement - (r.low if r.low is not None else r.agreement) for r in rows],
                [(r.high if r.high is not None else r.agreement) - r.agreement for r in rows],
            ]
        )
    ax.barh(
        y,
        values,
        height=0.6,
        xerr=errors,
        capsize=3,
        color=["tab:orange" if r.name in SUMMARY_ROWS else "tab:blue" for r in rows],
    )
    ax.set_yticks(y, [f"{_short(r.name)} (n={r.n}): {r.agreement:.1%}" for r in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top
    ax.set(xlim=(0, 1), xlabel="agreement")
    ax.set_title(_wrap(title or "Agreement per subset"), fontsize=10)
    return fig


def _wrap(text: str, width: int = 60) -> str:
    """A plot title on lines of at most `width` characters (a long data path would run off the figure)."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_long_words=True)) or text


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def dataset_card(summary: dict[str, Any], tables_md: str) -> str:
    """A Hub dataset card for the results folder: what was judged, how, and the tables."""
    settings = "\n".join(f"- **{k}**: {_code(v)}" for k, v in summary.items())
    return (
        "---\ntags:\n- pairrm-rlhf\n- reward-model-evaluation\n---\n\n"
        f"# Judge agreement: {escape_markdown(summary.get('model'))} on {escape_markdown(summary.get('data'))}\n\n"
        "Written by `pairrm-rlhf eval`. Files: `predictions.jsonl` (one line per example), `results.json`, "
        "`results.md`, and the plots `calibration.png` and `subsets.png` when matplotlib was installed.\n\n"
        f"## Settings\n\n{settings}\n\n## Results\n\n{tables_md}\n"
    )


def _code(value: Any) -> str:
    """`value` as one Markdown code span, fenced by more backticks than it holds."""
    text = " ".join(str(value).split())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if "`" in text else f"`{text}`"


def push_results(output_dir: str | Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Upload the results folder to a Hub dataset repo (created if needed, private by default); return its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(output_dir), repo_id=repo_id, repo_type="dataset", commit_message="pairrm-rlhf eval results"
    )
    return f"https://huggingface.co/datasets/{repo_id}"
