"""Preference labeling: sample K responses per prompt, score every pair with PairRM, emit DPO pairs.

`PreferenceLabeler.label` turns a `datasets.Dataset` of prompts into TRL preference rows (`prompt`, `chosen`,
`rejected`, plus scores and SPPO-style soft labels). The dataset is processed in chunks; with a `work_dir`
each finished chunk is saved atomically, so an interrupted run resumes where it stopped. Under
`accelerate launch` every process labels a contiguous shard of the chunks and the results are merged in
input order. `run_label` is the `pairrm-rlhf label` command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, Features, List, Value
from tqdm.auto import tqdm

from ..core import aggregation, assets
from ..core.engine import default_device
from ..core.generation import load_policy, sample_responses
from ..pairrm import PairRM

logger = logging.getLogger(__name__)

STRATEGIES = ("best_vs_worst", "best_vs_random", "best_vs_second", "all_pairs")
AGGREGATIONS = ("rank", "copeland", "bradley_terry")
BACKENDS = ("transformers", "vllm")
OUTPUT_FORMATS = ("save_to_disk", "jsonl", "parquet")
WORK_FORMAT = 1  # bump when the chunk files change meaning
_MESSAGE = {"role": Value("string"), "content": Value("string")}


@dataclass
class LabelStats:
    """Counts of one labeling run (or one chunk of it)."""

    prompts: int = 0
    pairs: int = 0
    ties_dropped: int = 0  # candidate pairs whose two responses had equal scores
    below_margin: int = 0  # candidate pairs with 0 < margin <= margin_threshold
    margin_sum: float = 0.0
    scored_pairs: int = 0  # unordered response pairs scored (both orders each)
    truncated_pairs: int = 0  # of those, pairs where PairRM had to cut some text

    @property
    def mean_margin(self) -> float:
        return self.margin_sum / self.pairs if self.pairs else float("nan")

    @property
    def truncation_rate(self) -> float:
        return self.truncated_pairs / self.scored_pairs if self.scored_pairs else 0.0

    def add(self, other: "LabelStats") -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


def select_pairs(
    scores: Sequence[float],
    strategy: str = "best_vs_worst",
    pairs_per_prompt: int | None = None,
    margin_threshold: float = 0.0,
    rng: np.random.Generator | None = None,
) -> tuple[list[tuple[int, int]], int, int]:
    """Pick (chosen, rejected) index pairs from one prompt's response scores.

    `best_vs_worst`, `best_vs_second` and `best_vs_random` pair the best response (the first of equal best)
    with the `pairs_per_prompt` (default 1) worst, next-best or randomly drawn others; `all_pairs` takes every
    pair, largest margin first (default: no cap). A pair whose margin is 0 is a tie and a pair with margin
    <= `margin_threshold` is too close: both are dropped. Returns (pairs, ties dropped, below-margin dropped).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    scores = [float(s) for s in scores]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))  # best first, stable
    best, others = order[0], order[1:]
    if strategy == "all_pairs":
        candidates = [(i, j) for a, i in enumerate(order) for j in order[a + 1 :]]
        candidates.sort(key=lambda p: -(scores[p[0]] - scores[p[1]]))  # stable: ties keep rank order
    elif strategy == "best_vs_worst":
        candidates = [(best, j) for j in reversed(others)]
    elif strategy == "best_vs_second":
        candidates = [(best, j) for j in others]
    else:
        if rng is None:
            raise ValueError("best_vs_random needs an rng")
        candidates = [(best, others[k]) for k in rng.permutation(len(others))]
    if strategy != "all_pairs":
        candidates = candidates[: pairs_per_prompt or 1]
    kept, ties, below = [], 0, 0
    for c, r in candidates:
        margin = scores[c] - scores[r]
        if margin == 0:
            ties += 1
        elif margin <= margin_threshold:
            below += 1
        else:
            kept.append((c, r))
    if strategy == "all_pairs" and pairs_per_prompt:
        kept = kept[:pairs_per_prompt]
    return kept, ties, below


class PreferenceLabeler:
    """Label prompts with preference pairs: sample K responses, score all pairs with PairRM, pick pairs.

    Args:
        pairrm: the scorer.
        policy: a transformers causal LM (or its path), or for `backend="vllm"` a model path or `vllm.LLM`.
            Not needed with `responses_column`.
        tokenizer: the policy's tokenizer (loaded from `policy` when it is a path).
        num_responses: K responses sampled per prompt (>= 2).
        responses_column: use this column's existing responses (>= 2 per row) instead of sampling.
        prompt_column: the column holding prompts (strings or message lists).
        aggregation: how the pairwise matrix becomes one score per response: `rank` (the reference
            round-robin score), `copeland` (wins + ties/2) or `bradley_terry` (strengths fitted to the
            pairwise probabilities).
        strategy, pairs_per_prompt, margin_threshold: which pairs to keep, see `select_pairs`.
        probability_temperature: T of P(A > B) = sigmoid((f(x,A,B) - f(x,B,A)) / 2T) for the soft labels.
        seed: sampling is seeded per chunk and `best_vs_random` per prompt, so results do not depend on the
            number of processes or on interruptions.
        generation_kwargs: passed to `model.generate` (transformers; default `do_sample=True`,
            `max_new_tokens=128`) or mapped to `SamplingParams` (vLLM: temperature, top_p, top_k,
            max_new_tokens, do_sample).
        generation_batch_size: prompts per generate call (transformers backend).
        scoring_batch_size: row cap of one PairRM forward (the engine's token budget always applies).

    Attributes:
        stats: `LabelStats` of the last `label` call.
        policy_name: names the policy in the resume fingerprint (default: its path or `name_or_path`).
    """

    def __init__(
        self,
        pairrm: PairRM,
        policy: Any = None,
        tokenizer: Any = None,
        *,
        num_responses: int = 4,
        responses_column: str | None = None,
        prompt_column: str = "prompt",
        aggregation: str = "rank",
        strategy: str = "best_vs_worst",
        pairs_per_prompt: int | None = None,
        margin_threshold: float = 0.0,
        probability_temperature: float = 1.0,
        seed: int = 0,
        backend: str = "transformers",
        generation_kwargs: dict[str, Any] | None = None,
        generation_batch_size: int = 16,
        scoring_batch_size: int | None = None,
    ):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if responses_column is None and num_responses < 2:
            raise ValueError(f"num_responses must be >= 2 (a preference pair needs two responses), got {num_responses}")
        if pairs_per_prompt is not None and pairs_per_prompt < 1:
            raise ValueError(f"pairs_per_prompt must be >= 1 or None, got {pairs_per_prompt}")
        if margin_threshold < 0:
            raise ValueError(f"margin_threshold must be >= 0, got {margin_threshold}")
        if not probability_temperature > 0:
            raise ValueError(f"probability_temperature must be > 0, got {probability_temperature}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if generation_batch_size < 1:
            raise ValueError(f"generation_batch_size must be >= 1, got {generation_batch_size}")
        self.pairrm = pairrm
        self.num_responses = num_responses
        self.responses_column = responses_column
        self.prompt_column = prompt_column
        self.aggregation = aggregation
        self.strategy = strategy
        self.pairs_per_prompt = pairs_per_prompt
        self.margin_threshold = float(margin_threshold)
        self.probability_temperature = float(probability_temperature)
        self.seed = seed
        self.backend = backend
        self.generation_kwargs = dict(generation_kwargs or {})
        self.generation_batch_size = generation_batch_size
        self.scoring_batch_size = scoring_batch_size
        self.stats = LabelStats()
        self.policy_name = policy if isinstance(policy, str) else _name_of(policy)
        self.policy, self.tokenizer = None, tokenizer
        if responses_column is None:
            if policy is None:
                raise ValueError("policy is required unless responses_column is given")
            if backend == "vllm":
                self.policy = _load_vllm(policy, seed) if isinstance(policy, str) else policy
            else:
                self.policy, self.tokenizer = (
                    load_policy(policy) if isinstance(policy, str) else (policy.eval(), tokenizer)
                )
                if self.tokenizer is None:
                    raise ValueError("tokenizer is required when policy is a model object")
                if self.tokenizer.pad_token is None:
                    self.tokenizer.pad_token = self.tokenizer.eos_token

    # ---- the pieces -------------------------------------------------------------------------------------
    def generate(self, prompts: list[Any], seed: int) -> list[list[str]]:
        """`num_responses` sampled responses per prompt, reproducible under `seed`."""
        if self.policy is None:
            raise ValueError("this labeler has no policy (it was built with responses_column)")
        if not prompts:
            return []
        if self.backend == "vllm":
            return self._generate_vllm(prompts, seed)
        if not isinstance(prompts[0], str) and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("conversational prompts need a policy tokenizer with a chat template")
        device = getattr(self.policy, "device", torch.device("cpu"))
        responses: list[list[str]] = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), self.generation_batch_size):
                batch = prompts[start : start + self.generation_batch_size]
                responses += sample_responses(
                    self.policy, self.tokenizer, batch, self.num_responses, **self.generation_kwargs
                )
        return responses

    def _generate_vllm(self, prompts: list[Any], seed: int) -> list[list[str]]:
        from vllm import SamplingParams

        kwargs = dict(self.generation_kwargs)
        unknown = set(kwargs) - {"temperature", "top_p", "top_k", "max_new_tokens", "do_sample"}
        if unknown:
            raise ValueError(f"generation_kwargs {sorted(unknown)} are not supported by the vllm backend")
        params = SamplingParams(
            n=self.num_responses,
            temperature=kwargs.get("temperature", 1.0) if kwargs.get("do_sample", True) else 0.0,
            top_p=kwargs.get("top_p", 1.0),
            top_k=kwargs.get("top_k") or -1,
            max_tokens=kwargs.get("max_new_tokens", 128),
            seed=seed,
        )
        if isinstance(prompts[0], str):
            outputs = self.policy.generate(prompts, params, use_tqdm=False)
        else:
            outputs = self.policy.chat(prompts, params, use_tqdm=False)
        return [[o.text for o in out.outputs] for out in outputs]

    def score_matrices(
        self, prompts: list[Any], responses: list[list[str]], first_index: int = 0
    ) -> tuple[list[np.ndarray], LabelStats]:
        """Single-order matrices M[i,j] = f(x, r_i, r_j) of every prompt (one engine call), and truncation counts.

        Prompts and responses become PairRM text through `judges.render`, as in the judge and reward functions.
        """
        from ..core.formats import render  # the project's one prompt/completion -> PairRM text renderer

        sources, candidates = [], []
        for k, (prompt, resp) in enumerate(zip(prompts, responses)):
            texts = [render(prompt, r, name=f"response {i} of row {first_index + k}") for i, r in enumerate(resp)]
            sources.append(texts[0][0])
            candidates.append([candidate for _, candidate in texts])
        matrices = self.pairrm.pairwise_matrices(
            sources, candidates, batch_size=self.scoring_batch_size, show_progress_bar=False
        )
        triples = [
            (s, c[i], c[j]) for s, c in zip(sources, candidates) for i in range(len(c)) for j in range(i + 1, len(c))
        ]
        stats = LabelStats(scored_pairs=len(triples))
        stats.truncated_pairs = round(self.pairrm.backend.truncation_rate(triples) * len(triples))
        return matrices, stats

    def aggregate(self, matrix: np.ndarray) -> np.ndarray:
        """One score per response from a single-order pairwise matrix, by `aggregation`."""
        if self.aggregation == "rank":
            return aggregation.round_robin_scores(matrix)
        if self.aggregation == "copeland":
            return aggregation.copeland_scores(matrix)
        probabilities = aggregation.probability(matrix - matrix.T, self.probability_temperature)
        return aggregation.bradley_terry_scores(probabilities)

    def rank_responses(self, prompts: list[Any], responses: list[list[str]]) -> list[np.ndarray]:
        """Scores (higher is better) of each prompt's responses."""
        matrices, _ = self.score_matrices(prompts, responses)
        return [self.aggregate(m) for m in matrices]

    def label_rows(
        self, prompts: list[Any], responses: list[list[str]], first_index: int = 0
    ) -> tuple[list[dict], LabelStats]:
        """Preference rows for prompts whose responses are known; `first_index` numbers the prompts."""
        matrices, stats = self.score_matrices(prompts, responses, first_index)
        stats.prompts = len(prompts)
        rows = []
        for k, (prompt, resp, matrix) in enumerate(zip(prompts, responses, matrices)):
            scores = self.aggregate(matrix)
            probs = aggregation.probability(matrix - matrix.T, self.probability_temperature)  # 0.5 on the diagonal
            win = probs.mean(axis=1)  # SPPO: mean P(r_i > r_j) over all K samples, itself included
            rng = np.random.default_rng([self.seed, first_index + k])
            pairs, ties, below = select_pairs(scores, self.strategy, self.pairs_per_prompt, self.margin_threshold, rng)
            stats.ties_dropped += ties
            stats.below_margin += below
            for c, r in pairs:
                margin = float(scores[c]) - float(scores[r])
                stats.pairs += 1
                stats.margin_sum += margin
                rows.append({
                    "prompt": prompt,
                    "chosen": _as_completion(resp[c], prompt),
                    "rejected": _as_completion(resp[r], prompt),
                    "score_chosen": float(scores[c]),
                    "score_rejected": float(scores[r]),
                    "margin": margin,
                    "chosen_probs": float(probs[c, r]),
                    "chosen_probs_win": float(win[c]),
                    "chosen_probs_lose": float(win[r]),
                    "all_generated_responses": list(resp),
                    "all_rm_scores": [float(s) for s in scores],
                    "prompt_index": first_index + k,
                })
        return rows, stats

    # ---- the whole dataset --------------------------------------------------------------------------------
    def label(
        self,
        dataset: Dataset,
        work_dir: str | os.PathLike | None = None,
        *,
        chunk_size: int = 256,
        overwrite: bool = False,
        show_progress: bool | None = None,
    ) -> Dataset:
        """Label `dataset` and return the preference pairs in input order (stats in `self.stats`).

        With `work_dir`, each finished chunk of `chunk_size` prompts is saved there and a later call with
        the same settings resumes; different settings are refused unless `overwrite=True`. Under
        `accelerate launch` each process labels a contiguous shard of the chunks; every process returns the
        merged dataset.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        conversational = self._check_dataset(dataset)
        features = self._features(dataset, conversational)
        state = _process_state()
        n_chunks = math.ceil(len(dataset) / chunk_size)
        work = Path(work_dir) if work_dir is not None else None
        done: set[int] = set()
        if work is not None:
            done = self._prepare_work_dir(work, self._settings(dataset, chunk_size), overwrite, state)
        pending = [i for i in range(n_chunks) if i not in done]
        mine = [int(i) for i in np.array_split(np.array(pending, dtype=int), state.num_processes)[state.process_index]]
        if done:
            logger.info("Resuming from %s: %d of %d chunks already done", work, len(done), n_chunks)
        if show_progress is None:
            show_progress = logger.getEffectiveLevel() <= logging.INFO
        results: list[tuple[int, pa.Table, LabelStats]] = []
        total = sum(min(chunk_size, len(dataset) - i * chunk_size) for i in mine)
        running = LabelStats()
        hide = not (show_progress and state.is_main_process)
        with tqdm(total=total, unit="prompt", desc="label", disable=hide) as bar:
            for index in mine:
                table, stats = self._label_chunk(dataset, index, chunk_size, features)
                if work is not None:
                    _write_chunk(work / _chunk_name(index), table, stats)
                else:
                    results.append((index, table, stats))
                self._chunk_done(index)
                running.add(stats)
                bar.set_postfix(pairs=running.pairs, ties=running.ties_dropped, refresh=False)
                bar.update(stats.prompts)
        state.wait_for_everyone()
        if work is not None:
            results = [(i, *_read_chunk(work / _chunk_name(i))) for i in range(n_chunks)]
        elif state.num_processes > 1:
            from accelerate.utils import gather_object

            results = sorted(gather_object(results), key=lambda item: item[0])
        self.stats = LabelStats()
        for _, _, stats in results:
            self.stats.add(stats)
        tables = [table for _, table, _ in results] or [features.arrow_schema.empty_table()]
        return Dataset(pa.concat_tables(tables).replace_schema_metadata(features.arrow_schema.metadata))

    def _label_chunk(
        self, dataset: Dataset, index: int, chunk_size: int, features: Features
    ) -> tuple[pa.Table, LabelStats]:
        start = index * chunk_size
        chunk = dataset[start : start + chunk_size]
        prompts = chunk[self.prompt_column]
        if self.responses_column is not None:
            column = self.responses_column
            responses = [_responses(f"{column}[{start + k}]", r) for k, r in enumerate(chunk[column])]
        else:
            responses = self.generate(prompts, _chunk_seed(self.seed, index))
        rows, stats = self.label_rows(prompts, responses, first_index=start)
        return pa.Table.from_pylist(rows, schema=features.arrow_schema), stats

    def _chunk_done(self, index: int) -> None:
        """Called after each chunk is finished (and saved); a hook for progress reporting and tests."""

    def _check_dataset(self, dataset: Dataset) -> bool:
        """Validate columns; return whether prompts are conversational (message lists)."""
        if not isinstance(dataset, Dataset):
            raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
        for column in (self.prompt_column, self.responses_column):
            if column is not None and column not in dataset.column_names:
                raise ValueError(f"dataset has no column {column!r} (columns: {dataset.column_names})")
        if len(dataset) == 0:
            return False
        first = dataset[0][self.prompt_column]
        if not isinstance(first, (str, list)):
            raise TypeError(
                f"{self.prompt_column}[0] must be a string or a list of messages, got {type(first).__name__}"
            )
        return isinstance(first, list)

    def _features(self, dataset: Dataset, conversational: bool) -> Features:
        completion = List(_MESSAGE) if conversational else Value("string")
        prompt = dataset.features[self.prompt_column] if len(dataset) else Value("string")
        return Features({
            "prompt": prompt, "chosen": completion, "rejected": completion,
            "score_chosen": Value("float64"), "score_rejected": Value("float64"), "margin": Value("float64"),
            "chosen_probs": Value("float64"), "chosen_probs_win": Value("float64"),
            "chosen_probs_lose": Value("float64"),
            "all_generated_responses": List(Value("string")), "all_rm_scores": List(Value("float64")),
            "prompt_index": Value("int64"),
        })

    def _settings(self, dataset: Dataset, chunk_size: int) -> dict[str, Any]:
        """Everything the output depends on: a run with other settings must not reuse saved chunks."""
        digest = hashlib.sha256()
        columns = [c for c in (self.prompt_column, self.responses_column) if c is not None]
        for batch in dataset.select_columns(columns).iter(batch_size=1024):
            digest.update(json.dumps(batch, sort_keys=True, ensure_ascii=False).encode())
        return {
            "format": WORK_FORMAT, "rows": len(dataset), "data_sha256": digest.hexdigest(), "chunk_size": chunk_size,
            "prompt_column": self.prompt_column, "responses_column": self.responses_column,
            "num_responses": None if self.responses_column else self.num_responses,
            "policy": None if self.responses_column else self.policy_name, "backend": self.backend,
            "generation_kwargs": None if self.responses_column else _jsonable(self.generation_kwargs),
            "generation_batch_size": None if self.responses_column else self.generation_batch_size,
            "pairrm": _weights_digest(self.pairrm), "aggregation": self.aggregation,
            "strategy": self.strategy, "pairs_per_prompt": self.pairs_per_prompt,
            "margin_threshold": self.margin_threshold, "probability_temperature": self.probability_temperature,
            "seed": self.seed,
        }

    def _prepare_work_dir(self, work: Path, settings: dict, overwrite: bool, state: Any) -> set[int]:
        """Check (every process) and create (main process) the manifest; return the chunks already done."""
        manifest = work / "manifest.json"
        fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        if manifest.exists() and not overwrite:
            saved = json.loads(manifest.read_text())
            if saved.get("fingerprint") != fingerprint:
                old = saved.get("settings", {})
                changed = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
                raise ValueError(
                    f"work_dir {str(work)!r} holds chunks of a run with other settings ({changed}); "
                    "use another work_dir or overwrite=True to discard them"
                )
        state.wait_for_everyone()  # everyone has read the manifest before the main process changes anything
        if state.is_main_process:
            work.mkdir(parents=True, exist_ok=True)
            for path in work.iterdir():  # leftovers of interrupted writes; every chunk when overwriting
                if ".tmp-" in path.name or (overwrite and (path.name.startswith("chunk-") or path == manifest)):
                    path.unlink()
            if not manifest.exists():
                text = json.dumps({"fingerprint": fingerprint, "settings": settings}, indent=1)
                _atomic_write(manifest, text.encode())
        state.wait_for_everyone()
        done = {int(p.name[len("chunk-") : -len(".arrow")]) for p in work.glob("chunk-*.arrow")}
        state.wait_for_everyone()  # everyone has listed before new chunks appear
        return done


def best_of_n_responses(
    pairrm: PairRM, policy: Any, tokenizer: Any, prompts: list[Any], n: int = 4, *, aggregation: str = "rank",
    seed: int = 0, **generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """Best-of-n at inference, keeping the evidence: per prompt `{"best", "responses", "scores"}`.

    Unlike `PairRM.best_of_n_generate` (which returns only the best string), prompts may be message lists
    (rendered with the chat template) and every sample comes back with its score.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2 for best-of-n, got {n}")
    labeler = PreferenceLabeler(pairrm, policy, tokenizer, num_responses=n, aggregation=aggregation, seed=seed,
                                generation_kwargs=generate_kwargs)
    responses = labeler.generate(list(prompts), seed)
    scores = labeler.rank_responses(list(prompts), responses)
    return [
        {"best": r[int(np.argmax(s))], "responses": r, "scores": [float(x) for x in s]}
        for r, s in zip(responses, scores)
    ]


# ---- text helpers ---------------------------------------------------------------------------------------
def _as_completion(response: str, prompt: Any) -> Any:
    return response if isinstance(prompt, str) else [{"role": "assistant", "content": response}]


def _responses(name: str, value: Any) -> list[str]:
    """Existing responses of one row: strings, or assistant messages / one-message lists."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of responses, got {type(value).__name__}")
    out = []
    for i, r in enumerate(value):
        if isinstance(r, list) and len(r) == 1:
            r = r[0]
        if isinstance(r, dict):
            r = r.get("content")
        if not isinstance(r, str):
            raise TypeError(f"{name}[{i}] must be a string or an assistant message")
        out.append(r)
    if len(out) < 2:
        raise ValueError(f"{name} has {len(out)} response(s); a preference pair needs at least 2")
    return out


def _name_of(model: Any) -> str | None:
    if model is None:
        return None
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or type(model).__name__


def _weights_digest(pairrm: PairRM) -> str:
    """A short digest of PairRM's head weights: identifies the checkpoint cheaply."""
    digest = hashlib.sha256()
    head = getattr(pairrm.backend.model, "head_layer", pairrm.backend.model)
    for name, tensor in sorted(head.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


def _process_state() -> Any:
    """accelerate's process state; on a machine without CUDA, processes talk through gloo on the CPU."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _chunk_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


# ---- chunk files --------------------------------------------------------------------------------------------
def _chunk_name(index: int) -> str:
    return f"chunk-{index:05d}.arrow"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_chunk(path: Path, table: pa.Table, stats: LabelStats) -> None:
    metadata = {**(table.schema.metadata or {}), b"pairrm_rlhf.stats": json.dumps(asdict(stats)).encode()}
    table = table.replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    _atomic_write(path, sink.getvalue().to_pybytes())


def _remove_work_dir(work: Path) -> None:
    """Delete the chunk files and manifest, then the directory if nothing else is in it."""
    for path in work.glob("chunk-*.arrow"):
        path.unlink()
    (work / "manifest.json").unlink(missing_ok=True)
    try:
        work.rmdir()
    except OSError:
        logger.warning("Left %s in place: it holds other files", work)


def _read_chunk(path: Path) -> tuple[pa.Table, LabelStats]:
    with pa.OSFile(str(path), "rb") as f:
        table = pa.ipc.open_file(f).read_all()
    stats = LabelStats(**json.loads(table.schema.metadata[b"pairrm_rlhf.stats"]))
    return table, stats


# ---- loading ---------------------------------------------------------------------------------------------
def _load_vllm(path: str, seed: int) -> Any:
    try:
        from vllm import LLM
    except ImportError as error:
        raise ImportError(
            "backend='vllm' needs the vllm package, which is not importable here "
            f"({error}); install it (pip install vllm) or use backend='transformers'"
        ) from error
    return LLM(model=path, seed=seed)


def load_prompts(source: str, config_name: str | None = None, split: str = "train") -> Dataset:
    """A dataset from a `save_to_disk` directory, a json/jsonl/parquet/csv file, a data directory or a hub id.

    `"tiny"` (when no such path exists) is the 32 bundled smoke-test prompts with a `reference` column.
    """
    import datasets

    source = assets.resolve(source, "prompts")
    path = Path(source)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"dataset {source!r} has no split {split!r} (splits: {list(loaded)})")
            loaded = loaded[split]
        return loaded
    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
    if path.is_file():
        if path.suffix not in builders:
            raise ValueError(f"dataset file {source!r} must be .json, .jsonl, .parquet or .csv")
        return datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
    return datasets.load_dataset(source, config_name, split=split)


def save_dataset(dataset: Dataset, path: str, output_format: str | None = None) -> str:
    """Write `dataset` atomically as `save_to_disk`, `jsonl` or `parquet` (default: by file extension)."""
    output_format = output_format or _format_of(path)
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    if output_format == "save_to_disk":
        if target.exists() and not (target / "dataset_info.json").exists():
            raise ValueError(f"output_path {path!r} exists and is not a saved dataset; refusing to replace it")
        dataset.save_to_disk(str(tmp))
        if target.exists():
            shutil.rmtree(target)
    elif output_format == "jsonl":
        dataset.to_json(str(tmp), lines=True, force_ascii=False)
    else:
        dataset.to_parquet(str(tmp))
    os.replace(tmp, target)
    return output_format


def _format_of(path: str) -> str:
    suffix = Path(path).suffix
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(suffix, "save_to_disk")


# ---- the `label` command --------------------------------------------------------------------------------------
@dataclass
class LabelConfig:
    """Sample K responses per prompt, score them pairwise with PairRM and write a DPO preference dataset."""

    dataset: str | None = field(default=None, metadata={"help": "prompts: save_to_disk dir, .json/.jsonl/.parquet/.csv file, hub id; 'tiny' = 32 bundled prompts"})
    dataset_config: str | None = field(default=None, metadata={"help": "hub dataset configuration name"})
    split: str = field(default="train", metadata={"help": "split to label"})
    prompt_column: str = field(default="prompt", metadata={"help": "column with prompts (strings or message lists)"})
    responses_column: str | None = field(default=None, metadata={"help": "label these existing responses instead of sampling"})
    max_prompts: int | None = field(default=None, metadata={"help": "label only the first N prompts"})
    policy: str | None = field(default=None, metadata={"help": "causal LM to sample from (hub id or dir); 'tiny' = the bundled tiny test policy"})
    policy_dtype: str | None = field(default=None, metadata={"help": "policy dtype (default: auto)"})
    backend: str = field(default="transformers", metadata={"help": "generation backend: transformers or vllm"})
    num_responses: int = field(default=4, metadata={"help": "K responses sampled per prompt (>= 2)"})
    max_new_tokens: int = field(default=256, metadata={"help": "max tokens per response"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling p"})
    top_k: int | None = field(default=None, metadata={"help": "top-k sampling (default: the model's generation config)"})
    generation_batch_size: int = field(default=16, metadata={"help": "prompts per generate call"})
    pairrm: str = field(default="llm-blender/PairRM-hf", metadata={"help": "PairRM checkpoint (hub id or dir); 'tiny' = the bundled tiny PairRM"})
    pairrm_base_model: str | None = field(default=None, metadata={"help": "blender layout: base encoder override"})
    pairrm_dtype: str | None = field(default=None, metadata={"help": "PairRM dtype: float32, bfloat16, float16 (default by device)"})
    scoring_batch_size: int | None = field(default=None, metadata={"help": "row cap of one PairRM forward"})
    device: str | None = field(default=None, metadata={"help": "device for both models (default: this process's accelerate device)"})
    aggregation: str = field(default="rank", metadata={"help": "response score: rank (reference round-robin), copeland or bradley_terry"})
    strategy: str = field(default="best_vs_worst", metadata={"help": "pairs: best_vs_worst, best_vs_random, best_vs_second or all_pairs"})
    pairs_per_prompt: int | None = field(default=None, metadata={"help": "pairs per prompt (default 1; all_pairs: all)"})
    margin_threshold: float = field(default=0.0, metadata={"help": "drop pairs whose score margin is <= this (ties are always dropped)"})
    probability_temperature: float = field(default=1.0, metadata={"help": "T of P(A>B) = sigmoid(two-order logit / 2T) in chosen_probs*"})
    seed: int = field(default=0, metadata={"help": "sampling and best_vs_random seed"})
    output_path: str | None = field(default=None, metadata={"help": "where to write the preference dataset"})
    output_format: str | None = field(default=None, metadata={"help": "save_to_disk, jsonl or parquet (default: by output_path extension)"})
    chunk_size: int = field(default=256, metadata={"help": "prompts per saved chunk (the unit of resume)"})
    work_dir: str | None = field(default=None, metadata={"help": "where finished chunks are kept (default: <output_path>.chunks)"})
    overwrite: bool = field(default=False, metadata={"help": "discard chunks of an earlier run with other settings"})
    keep_chunks: bool = field(default=False, metadata={"help": "keep work_dir after the output is written"})
    push_to_hub: str | None = field(default=None, metadata={"help": "also push the dataset to this hub repo id"})
    hub_private: bool = field(default=True, metadata={"help": "push as a private dataset"})


def run_label(config: LabelConfig) -> Dataset:
    """Run the `label` command: load, label (resumable, sharded under accelerate), write, print a summary."""
    if not config.dataset:
        raise ValueError("dataset is required (a local path or a hub id)")
    if not config.output_path:
        raise ValueError("output_path is required")
    if config.policy is None and config.responses_column is None:
        raise ValueError("policy is required unless responses_column is given")
    if config.output_format is not None and config.output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {config.output_format!r}")
    state = _process_state()
    device = config.device or state.device
    with state.main_process_first():
        dataset = load_prompts(config.dataset, config.dataset_config, config.split)
    if config.max_prompts is not None:
        dataset = dataset.select(range(min(config.max_prompts, len(dataset))))
    pairrm = PairRM.from_pretrained(
        config.pairrm,
        base_model=config.pairrm_base_model, device=device, dtype=config.pairrm_dtype,
    )
    generation_kwargs: dict[str, Any] = {"do_sample": True, "max_new_tokens": config.max_new_tokens,
                                         "temperature": config.temperature, "top_p": config.top_p}
    if config.top_k is not None:
        generation_kwargs["top_k"] = config.top_k
    policy, tokenizer = config.policy, None
    if config.responses_column is None and config.backend == "transformers":
        policy, tokenizer = load_policy(config.policy, device, config.policy_dtype)
    labeler = PreferenceLabeler(
        pairrm, policy, tokenizer, num_responses=config.num_responses, responses_column=config.responses_column,
        prompt_column=config.prompt_column, aggregation=config.aggregation, strategy=config.strategy,
        pairs_per_prompt=config.pairs_per_prompt, margin_threshold=config.margin_threshold,
        probability_temperature=config.probability_temperature, seed=config.seed, backend=config.backend,
        generation_kwargs=generation_kwargs, generation_batch_size=config.generation_batch_size,
        scoring_batch_size=config.scoring_batch_size,
    )
    labeler.policy_name = config.policy  # the path identifies the run, not the in-memory object
    work_dir = Path(config.work_dir or f"{config.output_path}.chunks")
    result = labeler.label(
        dataset, work_dir, chunk_size=config.chunk_size, overwrite=config.overwrite, show_progress=True
    )
    if state.is_main_process:
        output_format = save_dataset(result, config.output_path, config.output_format)
        if config.push_to_hub:
            result.push_to_hub(config.push_to_hub, private=config.hub_private)
        if not config.keep_chunks:
            _remove_work_dir(work_dir)
        s = labeler.stats
        pushed = f"; pushed to {config.push_to_hub} ({'private' if config.hub_private else 'public'})"
        print(
            f"Labeled {s.prompts} prompts -> {s.pairs} pairs ({s.ties_dropped} ties dropped, "
            f"{s.below_margin} below margin {config.margin_threshold}); mean margin {s.mean_margin:.4f}; "
            f"PairRM truncation rate {s.truncation_rate:.1%}\n"
            f"Wrote {config.output_path} ({output_format})"
            + (pushed if config.push_to_hub else "")
        )
    state.wait_for_everyone()
    return result
