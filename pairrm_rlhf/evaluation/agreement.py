"""Agreement of a pairwise judge with human (or benchmark) preference labels: reading, scoring, summarising.

Each example has a prompt, one or more chosen responses and one or more rejected ones. The judge is right when every
chosen response beats every rejected one (one pair for pairwise data; one chosen vs three rejected for
RewardBench-2-style best-of-4). Pairs are scored in both slot orders by default (the two-order logit
z = f(x,c,r) - f(x,r,c)). Ties are skipped, or counted right when |z| <= `tie_margin` (`ties="margin"`).
Agreement is reported per subset and overall, with percentile bootstrap confidence intervals.

Loaders read what `pairrm-rlhf label` writes (a `save_to_disk` folder, .jsonl, .parquet), .json files, or hub
datasets, in these formats (detected from the columns; `columns=` maps other names onto prompt/chosen/rejected):
pairs (`prompt`/`chosen`/`rejected`, RewardBench's `subset`), labelled pairs (`response_a`/`response_b`/`label`),
best-of-4 (RewardBench 2: `chosen`/`rejected` lists), Auto-J pairwise (`response 1`/`response 2`/`label`,
`scenario`), HHH alignment (`input`/`targets`), MT-bench human judgements (`conversation_a`/`conversation_b`/`winner`).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import data

logger = logging.getLogger(__name__)

FORMATS = ("auto", "pairs", "labelled", "best_of_n", "autoj", "hhh", "mtbench")
TIE_LABELS = {"tie", "tie (bothbad)", "2", "tie_both_bad"}
SUMMARY_ROWS = ("macro average", "overall")


@dataclass
class Example:
    """One judged item: chosen responses must beat rejected ones (or, for a tie, neither clearly wins)."""

    prompt: Any
    chosen: list[Any]
    rejected: list[Any]
    subset: str = "all"
    tie: bool = False
    conversations: tuple | None = None  # MT-bench: (conversation of the preferred side, the other one)


# ---- reading ---------------------------------------------------------------------------------------------------
def read_rows(source: str, split: str = "test", config_name: str | None = None) -> list[dict]:
    """Rows of a `save_to_disk` folder, a local .jsonl/.json/.parquet/.csv file, or a hub dataset split, read by the
    package's one reader (`pairrm_rlhf.data`: its errors start with `--data` and name the file and line or row).

    A name that looks like a local path (`./`, `/`, `~`, a file extension) and does not exist is a
    FileNotFoundError, never a hub lookup.
    """
    return data.read_rows(source, split=split, config_name=config_name, what="--data")


def map_columns(rows: list[dict], columns: dict[str, str], source: str = "data") -> list[dict]:
    """Rows with the columns named in `columns` (standard name -> column in the data) renamed to the standard
    names (`prompt`, `chosen`, `rejected`); a ValueError names the flag and lists the data's columns when a column
    is missing."""
    columns = {std: col for std, col in columns.items() if col and col != std}
    if not columns or not rows:
        return rows
    data.require_columns(data.columns_of(rows), {f"{std}_column": col for std, col in columns.items()}, source)
    return [
        {
            **{k: v for k, v in row.items() if k not in columns.values()},
            **{std: row.get(col) for std, col in columns.items()},
        }
        for row in rows
    ]


def detect_format(row: dict) -> str:
    """The data format of a row, from its columns."""
    if "conversation_a" in row and "winner" in row:
        return "mtbench"
    if "response 1" in row and "label" in row:
        return "autoj"
    if "targets" in row and "input" in row:
        return "hhh"
    if "chosen" in row and "rejected" in row:
        return (
            "best_of_n"
            if isinstance(row["rejected"], list) and row["rejected"] and (not isinstance(row["rejected"][0], dict))
            else "pairs"
        )
    if "response_a" in row and "response_b" in row and "label" in row:
        return "labelled"
    raise ValueError(
        f"--format: cannot tell the data format from the columns {sorted(row)}; pass --format or the "
        "--prompt_column/--chosen_column/--rejected_column names"
    )


def _pair(prompt: Any, a: Any, b: Any, label: Any, subset: str) -> Example:
    """An example from two responses and a label naming the better one (0/'A'/'model_a' -> a, 1/'B' -> b)."""
    key = str(label).strip().lower()
    if key in TIE_LABELS:
        return Example(prompt, [a], [b], subset, tie=True)
    if key in ("0", "a", "model_a", "response_a", "response 1"):
        return Example(prompt, [a], [b], subset)
    if key in ("1", "b", "model_b", "response_b", "response 2"):
        return Example(prompt, [b], [a], subset)
    raise ValueError(f"unknown preference label {label!r}")


def to_examples(rows: list[dict], fmt: str = "auto", subset: str | None = None) -> list[Example]:
    """Examples from rows of a known format; `subset` names all rows' subset when the data has none."""
    if not rows:
        return []
    fmt = detect_format(rows[0]) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    default = subset or "all"
    out = []
    for i, row in enumerate(rows):
        try:
            name = str(row.get("subset") or row.get("scenario") or row.get("group") or default)
            if fmt == "pairs":
                out.append(Example(row.get("prompt", ""), [row["chosen"]], [row["rejected"]], name))
            elif fmt == "best_of_n":
                chosen = row["chosen"] if isinstance(row["chosen"], list) else [row["chosen"]]
                out.append(Example(row["prompt"], list(chosen), list(row["rejected"]), name))
            elif fmt == "labelled":
                out.append(_pair(row.get("prompt", ""), row["response_a"], row["response_b"], row["label"], name))
            elif fmt == "autoj":
                out.append(_pair(row["prompt"], row["response 1"], row["response 2"], row["label"], name))
            elif fmt == "hhh":
                choices, labels = row["targets"]["choices"], row["targets"]["labels"]
                best = labels.index(1)
                rest = [c for k, c in enumerate(choices) if k != best]
                out.append(Example(row["input"], [choices[best]], rest, name))
            elif fmt == "mtbench":
                name = str(row.get("subset") or (f"turn {row['turn']}" if "turn" in row else default))
                a, b = row["conversation_a"], row["conversation_b"]
                ex = _pair(None, a, b, row["winner"], name)
                ex.conversations = (ex.chosen[0], ex.rejected[0])
                out.append(ex)
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"row {i} is not valid {fmt} data: {err!r}") from err
    return out


def load_examples(
    source: str,
    fmt: str = "auto",
    split: str = "test",
    config_name: str | None = None,
    limit: int | None = None,
    columns: dict[str, str] | None = None,
) -> list[Example]:
    """Read and convert a preference dataset (see the module docstring for the formats).

    Args:
        source: a `save_to_disk` folder, a .jsonl/.json/.parquet file or a hub dataset id.
        fmt: one of `FORMATS` (`auto`: from the columns).
        split, config_name: hub datasets and `DatasetDict` folders.
        limit: keep the first `limit` rows.
        columns: standard name -> the data's column, e.g. `{"prompt": "question"}`.

    Returns:
        The examples, in the data's order.

    Example:
        >>> examples = load_examples("labels.jsonl", columns={"prompt": "question"})  # doctest: +SKIP
    """
    rows = read_rows(source, split, config_name)
    if limit is not None:
        rows = rows[:limit]
    return to_examples(map_columns(rows, columns or {}, source), fmt, subset=config_name)


# ---- scoring -------------------------------------------------------------------------------------------------------
def example_logits(
    model: Any, examples: list[Example], batch_size: int | None = None, orders: str = "both"
) -> list[np.ndarray | None]:
    """For each example, z of every (chosen, rejected) pair (> 0: chosen wins); None when the judge cannot score it.

    `orders="both"`: z = f(x,c,r) - f(x,r,c); `"single"`: f(x,c,r) with the chosen response in slot A.
    """
    from ..core.formats import (
        CONVERSATION_INSTRUCTION,
        conversation_triples,
        pairrm_candidate,
        pairrm_source,
        render,
        render_conversations,
    )

    triples, owner = [], []
    for k, ex in enumerate(examples):
        try:
            if ex.conversations is not None:
                conv_c, conv_r = ex.conversations
                if model.template == "pairrm":
                    inputs, cands_c, cands_r = render_conversations([conv_c], [conv_r])
                    new = [
                        (
                            pairrm_source(inputs[0], CONVERSATION_INSTRUCTION),
                            pairrm_candidate(cands_c[0]),
                            pairrm_candidate(cands_r[0]),
                        )
                    ]
                else:
                    new = conversation_triples([conv_c], [conv_r])
            else:
                new = []
                for c in ex.chosen:
                    source, cand_c = render(ex.prompt, c, name=f"example {k} chosen")
                    for r in ex.rejected:
                        new.append((source, cand_c, render(ex.prompt, r, name=f"example {k} rejected")[1]))
        except (ValueError, TypeError) as err:
            logger.warning("skipping example %d: %s", k, err)
            continue
        triples += new
        owner += [k] * len(new)
    if orders == "both":
        z = model.two_order_logits(triples, batch_size=batch_size)
    elif orders == "single":
        z = model.pair_logits(triples, batch_size=batch_size)
    else:
        raise ValueError(f"orders must be 'both' or 'single', got {orders!r}")
    out: list[np.ndarray | None] = [None] * len(examples)
    owner_arr = np.asarray(owner)
    for k in set(owner):
        out[k] = np.asarray(z)[owner_arr == k]
    return out


def correctness(
    logits: list[np.ndarray | None], examples: list[Example], ties: str = "skip", tie_margin: float = 0.0
) -> list[float | None]:
    """1.0 / 0.0 per example (None: not counted). Non-ties are right when every pair's z > tie_margin (ties="margin")
    or > 0; with ties="margin" a tie is right when every |z| <= tie_margin; with ties="skip" ties are not counted."""
    if ties not in ("skip", "margin"):
        raise ValueError(f"ties must be 'skip' or 'margin', got {ties!r}")
    margin = tie_margin if ties == "margin" else 0.0
    out: list[float | None] = []
    for z, ex in zip(logits, examples):
        if z is None or (ex.tie and ties == "skip"):
            out.append(None)
        elif ex.tie:
            out.append(float(np.all(np.abs(z) <= margin)))
        else:
            out.append(float(np.all(z > margin)))
    return out


def bootstrap_ci(
    values: np.ndarray, n: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean of `values`; (None, None) when there is none (no values, n == 0)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0 or n <= 0:
        return None, None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


@dataclass
class SubsetResult:
    """Agreement on one subset (or a summary row): `n` counted examples, the 95% interval (None without bootstrap)."""

    name: str
    n: int
    agreement: float
    low: float | None
    high: float | None
    skipped: int = 0


def summarize(
    correct: list[float | None], examples: list[Example], bootstrap: int = 1000, seed: int = 0
) -> list[SubsetResult]:
    """Agreement per subset (sorted by name), then `macro average` (mean of subsets) and `overall` (all examples).

    With a single subset (e.g. data without a `subset` column) there is one row, `overall`: a subset row would
    repeat it (`subset_agreement` still gives that subset's number).
    """
    groups: dict[str, list[float]] = defaultdict(list)
    skipped: dict[str, int] = defaultdict(int)
    for value, ex in zip(correct, examples):
        if value is None:
            skipped[ex.subset] += 1
        else:
            groups[ex.subset].append(value)
    results = []
    names = sorted(set(groups) | set(skipped))
    for name in names if len(names) > 1 else []:
        values = np.asarray(groups[name])
        mean = float(values.mean()) if len(values) else float("nan")
        results.append(
            SubsetResult(name, len(values), mean, *bootstrap_ci(values, bootstrap, seed=seed), skipped[name])
        )
    scored = [r for r in results if r.n]
    everything = np.asarray([v for vs in groups.values() for v in vs])
    if len(scored) > 1:
        # macro average: resample within each subset, average the subset means
        low = high = None
        if bootstrap > 0:
            rng = np.random.default_rng(seed)
            arrays = [np.asarray(groups[r.name]) for r in scored]
            boots = np.mean([a[rng.integers(0, len(a), size=(bootstrap, len(a)))].mean(axis=1) for a in arrays], axis=0)
            low, high = float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))
        results.append(
            SubsetResult(
                "macro average", sum(r.n for r in scored), float(np.mean([r.agreement for r in scored])), low, high
            )
        )
    results.append(
        SubsetResult(
            "overall",
            len(everything),
            float(everything.mean()) if len(everything) else float("nan"),
            *bootstrap_ci(everything, bootstrap, seed=seed),
            sum(skipped.values()),
        )
    )
    return results


def subset_agreement(results: list[SubsetResult], examples: list[Example]) -> dict[str, float]:
    """Subset name -> agreement, for the subsets that have counted examples (a single subset: the overall row)."""
    subsets = {ex.subset for ex in examples}
    if len(subsets) == 1:
        return {subsets.pop(): r.agreement for r in results if r.name == "overall" and r.n}
    return {r.name: r.agreement for r in results if r.n and r.name not in SUMMARY_ROWS}


def escape_markdown(text: Any) -> str:
    """`text` safe inside a Markdown table cell or heading: one line, `|` and the characters that start emphasis,
    code, links or HTML escaped (an underscore inside a word is left alone, as GitHub's Markdown reads it)."""
    text = " ".join(str(text).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*|\[\]])|(?<!\w)_|_(?!\w)", lambda m: "\\" + m.group(0), text)


def format_table(results: list[SubsetResult], title: str = "") -> str:
    """A markdown table like the PairRM model card's: subset, N, agreement, its 95% bootstrap interval (when
    computed) and the examples not counted (ties, unscorable). Names are escaped (`escape_markdown`)."""
    lines = [f"### {escape_markdown(title)}", ""] if title else []
    with_ci = any(r.low is not None for r in results)
    lines += [
        "| Subset | N | Agreement |" + (" 95% CI |" if with_ci else "") + " Skipped |",
        "|:--|--:|--:|" + (":--:|" if with_ci else "") + "--:|",
    ]
    for r in results:
        name = f"**{r.name}**" if r.name in SUMMARY_ROWS else escape_markdown(r.name)
        ci = ""
        if with_ci:
            ci = f" [{r.low:.2%}, {r.high:.2%}] |" if r.low is not None else " – |"
        lines.append(f"| {name} | {r.n} | {r.agreement:.2%} |{ci} {r.skipped} |")
    return "\n".join(lines)


def evaluate(
    model: Any,
    examples: list[Example],
    *,
    ties: str = "skip",
    tie_margin: float = 0.0,
    orders: str = "both",
    bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int | None = None,
) -> list[SubsetResult]:
    """Agreement of `model` (a `PairRM` on any backend) with the labels of `examples`."""
    logits = example_logits(model, examples, batch_size=batch_size, orders=orders)
    return summarize(correctness(logits, examples, ties, tie_margin), examples, bootstrap, seed)
