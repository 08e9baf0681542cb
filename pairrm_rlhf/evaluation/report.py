"""What `pairrm-rlhf eval` leaves behind: per-example predictions, the tables, two plots and an optional Hub push.

Files in the output folder:

- `predictions.jsonl`: one line per example: `index`, `subset`, `tie`, `logits` (z of every chosen-vs-rejected pair),
  `p_chosen` (the judge's probability that the chosen response wins its weakest pair; null when unscorable) and
  `correct` (1/0, null when not counted).
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.aggregation import probability
from .agreement import Example, SubsetResult

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


def prediction_records(examples: Sequence[Example], logits: Sequence[np.ndarray | None],
                       correct: Sequence[float | None], orders: str = "both") -> list[dict[str, Any]]:
    """One JSON-ready record per example (see the module docstring)."""
    return [
        {"index": k, "subset": ex.subset, "tie": ex.tie,
         "logits": None if z is None else [float(v) for v in z],
         "p_chosen": example_probability(z, orders), "correct": c}
        for k, (ex, z, c) in enumerate(zip(examples, logits, correct))
    ]


def calibration_bins(records: Sequence[dict], bins: int = 10) -> list[dict[str, float]]:
    """Predicted P(chosen) against observed agreement in `bins` equal-width bins over [0, 1] (empty bins left out).

    Returns:
        [{"low", "high", "n", "predicted" (mean p in the bin), "observed" (mean correct)}].

    Example:
        >>> calibration_bins([{"p_chosen": 0.95, "correct": 1.0}, {"p_chosen": 0.91, "correct": 0.0}], bins=10)[0]["observed"]
        0.5
    """
    counted = [(r["p_chosen"], r["correct"]) for r in records if r["p_chosen"] is not None and r["correct"] is not None]
    out = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = [(p, c) for p, c in counted if low <= p < high or (b == bins - 1 and p == 1.0)]
        if inside:
            out.append({"low": low, "high": high, "n": len(inside),
                        "predicted": float(np.mean([p for p, _ in inside])),
                        "observed": float(np.mean([c for _, c in inside]))})
    return out


def write_results(output_dir: str | Path, records: Sequence[dict], results: Sequence[SubsetResult],
                  tables_md: str, summary: dict[str, Any]) -> dict[str, Path]:
    """Write predictions.jsonl, results.md and results.json into `output_dir`; return the paths by name."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"predictions": folder / "predictions.jsonl", "table": folder / "results.md", "json": folder / "results.json"}
    with paths["predictions"].open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    paths["table"].write_text(tables_md + "\n")
    paths["json"].write_text(json.dumps({**summary, "results": [r.__dict__ for r in results],
                                         "calibration": calibration_bins(records)}, indent=2))
    return paths


def write_plots(output_dir: str | Path, records: Sequence[dict], results: Sequence[SubsetResult],
                title: str = "") -> dict[str, Path]:
    """calibration.png and subsets.png in `output_dir` ({} with a warning when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install pairrm-rlhf[plots]): no plots written")
        return {}
    folder = Path(output_dir)
    paths = {}
    bins = calibration_bins(records)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    if bins:
        ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], marker="o", label="judge")
        for b in bins:
            ax.annotate(str(b["n"]), (b["predicted"], b["observed"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(chosen)", ylabel="observed agreement",
           title=f"Calibration{': ' + title if title else ''}")
    ax.legend(loc="upper left")
    paths["calibration"] = folder / "calibration.png"
    fig.savefig(paths["calibration"], dpi=100, bbox_inches="tight")
    plt.close(fig)

    rows = [r for r in results if r.n]
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(rows) + 1.2))
    y = np.arange(len(rows))
    values = [r.agreement for r in rows]
    errors = None
    if any(r.low is not None for r in rows):
        errors = np.array([[r.agreement - (r.low if r.low is not None else r.agreement) for r in rows],
                           [(r.high if r.high is not None else r.agreement) - r.agreement for r in rows]])
    ax.barh(y, values, xerr=errors, color=["tab:orange" if r.name in ("overall", "macro average") else "tab:blue" for r in rows])
    ax.set_yticks(y, [f"{r.name} (n={r.n})" for r in rows])
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="agreement", title=title or "Agreement per subset")
    paths["subsets"] = folder / "subsets.png"
    fig.savefig(paths["subsets"], dpi=100, bbox_inches="tight")
    plt.close(fig)
    return paths


def dataset_card(summary: dict[str, Any], tables_md: str) -> str:
    """A Hub dataset card for the results folder: what was judged, how, and the tables."""
    settings = "\n".join(f"- **{k}**: `{v}`" for k, v in summary.items())
    return (
        "---\ntags:\n- pairrm-rlhf\n- reward-model-evaluation\n---\n\n"
        f"# Judge agreement: {summary.get('model')} on {summary.get('data')}\n\n"
        "Written by `pairrm-rlhf eval`. Files: `predictions.jsonl` (one line per example), `results.json`, "
        "`results.md`, and the plots `calibration.png` and `subsets.png` when matplotlib was installed.\n\n"
        f"## Settings\n\n{settings}\n\n## Results\n\n{tables_md}\n"
    )


def push_results(output_dir: str | Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Upload the results folder to a Hub dataset repo (created if needed, private by default); return its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(output_dir), repo_id=repo_id, repo_type="dataset",
                      commit_message="pairrm-rlhf eval results")
    return f"https://huggingface.co/datasets/{repo_id}"
