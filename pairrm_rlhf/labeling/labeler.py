"""`PreferenceLabeler`: sample K responses per prompt, score every pair with a judge, emit DPO pairs.

`PreferenceLabeler.label` turns a `datasets.Dataset` of prompts into TRL preference rows (`prompt`, `chosen`,
`rejected`, plus scores and SPPO-style soft labels). The judge is any `PairRM` (over any `PairBackend`: the encoder,
Better-PairRM, RLHFlow or a remote server); the labeler uses only the face's `pairwise_matrices` and the backend
protocol (`truncation_rate`, `identity`). The dataset is processed in chunks; with a `work_dir` each finished chunk
is saved in a `store.ChunkStore`, so an interrupted run resumes where it stopped and never mixes in chunks of
another model, other settings or other data. Under `accelerate launch` every process labels a contiguous shard
of the chunks and the results are merged in input order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, Features, List, Value
from tqdm.auto import tqdm

from ..core import aggregation
from ..core.backend import PairBackend
from ..core.formats import CONVERSATION_FORMATS, is_finished, render
from ..core.generation import SamplingArguments
from ..core.progress import progress_enabled
from ..core.sampling import check_backend
from ..core.settings import check_choice
from ..data import check_prompts, require_columns
from ..pairrm import PairRM
from .generation import ResponseSampler
from .pairs import AGGREGATIONS, STRATEGIES, LabelStats, aggregate, select_pairs
from .store import WORK_FORMAT, ChunkStore

logger = logging.getLogger(__name__)

_MESSAGE = {"role": Value("string"), "content": Value("string")}


class PreferenceLabeler:
    """Label prompts with preference pairs: sample K responses, score all pairs with a judge, pick pairs.

    Args:
        pairrm: the judge: a `PairRM` (or a bare `PairBackend`, wrapped in one).
        policy: a transformers causal LM (or its path), or for `backend="vllm"` a model path or `vllm.LLM`.
            Not needed with `responses_column`.
        tokenizer: the policy's tokenizer (loaded from `policy` when it is a path).
        num_responses: K responses sampled per prompt (>= 2).
        responses_column: use this column's existing responses (>= 2 per row) instead of sampling.
        prompt_column: the column holding prompts (strings or message lists).
        aggregation: how the pairwise matrix becomes one score per response: `rank` (the reference
            round-robin score), `copeland` (wins + ties/2) or `bradley_terry` (strengths fitted to the
            pairwise probabilities).
        strategy, pairs_per_prompt, margin_threshold: which pairs to keep, see `pairs.select_pairs`.
        allow_unfinished_chosen: let a sampled response cut at `max_new_tokens` (no EOS) be `chosen`. Off by
            default: PairRM prefers longer text, so truncated responses would otherwise teach rambling. The rows'
            `finished` column (one flag per response of `all_generated_responses`) says which ended; existing
            responses from `responses_column` count as finished.
        len_penalty: the `max_min_p` strategy's penalty per character of response (RLHFlow's `--len_penalty`).
        conversation_format: `pairrm` or `plain` (single-turn conversations as plain text, as SPPO labelled; see
            `core.formats.render`).
        probability_temperature: T of P(A > B) = sigmoid((f(x,A,B) - f(x,B,A)) / 2T) for the soft labels.
        seed: sampling is seeded per chunk and `best_vs_random` per prompt, so results do not depend on the
            number of processes or on interruptions.
        backend: `transformers` or `vllm` (sampling).
        sampling: how responses are sampled (`core.generation.SamplingArguments`; default: temperature 1, no
            filtering, 256 new tokens). The checkpoint's generation_config applies only with
            `use_checkpoint_sampling=True`; both backends get the same parameters.
        generation_batch_size: prompts per generate call (transformers backend).
        scoring_batch_size: row cap of one judge forward (the engine's token budget always applies).

    Attributes:
        stats: `LabelStats` of the last `label` call (`stats.mean_margin` is `margin_sum / pairs`).
        policy_name: names the policy in the run identity (default: its path or `name_or_path`).
        dataset_name: names the data in errors about its rows (default "dataset"; `label` sets the file's name).

    Example:
        >>> labeler = PreferenceLabeler(PairRM.from_pretrained("tiny"), "tiny", num_responses=4,
        ...                             sampling=SamplingArguments(max_new_tokens=32, temperature=0.7))
        >>> pairs = labeler.label(Dataset.from_dict({"prompt": ["Write a haiku."]}), work_dir="pairs.chunks")
        >>> labeler.stats.pairs
        1
    """

    def __init__(
        self,
        pairrm: PairRM | PairBackend,
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
        allow_unfinished_chosen: bool = False,
        len_penalty: float = 0.0,
        conversation_format: str = "pairrm",
        probability_temperature: float = 1.0,
        seed: int = 0,
        backend: str = "transformers",
        sampling: SamplingArguments | None = None,
        generation_batch_size: int = 16,
        scoring_batch_size: int | None = None,
    ):
        check_choice("aggregation", aggregation, AGGREGATIONS)
        check_choice("strategy", strategy, STRATEGIES)
        check_backend(backend, "backend")
        if responses_column is None and num_responses < 2:
            raise ValueError(f"num_responses must be >= 2 (a preference pair needs two responses), got {num_responses}")
        if pairs_per_prompt is not None and pairs_per_prompt < 1:
            raise ValueError(f"pairs_per_prompt must be >= 1 or None, got {pairs_per_prompt}")
        if margin_threshold < 0:
            raise ValueError(f"margin_threshold must be >= 0, got {margin_threshold}")
        check_choice("conversation_format", conversation_format, CONVERSATION_FORMATS)
        if not len_penalty >= 0:
            raise ValueError(f"len_penalty must be >= 0, got {len_penalty}")
        if not probability_temperature > 0:
            raise ValueError(f"probability_temperature must be > 0, got {probability_temperature}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not isinstance(pairrm, PairRM):
            if not isinstance(pairrm, PairBackend):
                raise TypeError(f"pairrm must be a PairRM or a PairBackend, got {type(pairrm).__name__}")
            pairrm = PairRM(pairrm)
        self.pairrm = pairrm
        self.responses_column = responses_column
        self.prompt_column = prompt_column
        self.aggregation = aggregation
        self.strategy = strategy
        self.pairs_per_prompt = pairs_per_prompt
        self.margin_threshold = float(margin_threshold)
        self.allow_unfinished_chosen = bool(allow_unfinished_chosen)
        self.len_penalty = float(len_penalty)
        self.conversation_format = conversation_format
        self.probability_temperature = float(probability_temperature)
        self.seed = seed
        self.scoring_batch_size = scoring_batch_size
        self.stats = LabelStats()
        self.dataset_name = "dataset"
        self.sampler: ResponseSampler | None = None
        if responses_column is None:
            if policy is None:
                raise ValueError("policy is required unless responses_column is given")
            self.sampler = ResponseSampler(
                policy, tokenizer, num_responses=num_responses, sampling=sampling, backend=backend,
                batch_size=generation_batch_size,
            )

    @property
    def policy_name(self) -> str | None:
        return self.sampler.name if self.sampler else None

    @policy_name.setter
    def policy_name(self, name: str | None) -> None:
        if self.sampler is not None:
            self.sampler.name = name

    # ---- the pieces -------------------------------------------------------------------------------------
    def generate(self, prompts: list[Any], seed: int) -> list[list[str]]:
        """K sampled responses per prompt, reproducible under `seed`."""
        if self.sampler is None:
            raise ValueError("this labeler has no policy (it was built with responses_column)")
        return self.sampler.generate(prompts, seed)

    def score_matrices(
        self, prompts: list[Any], responses: list[list[str]], first_index: int = 0
    ) -> tuple[list[np.ndarray], LabelStats]:
        """Single-order matrices M[i,j] = f(x, r_i, r_j) of every prompt (one judge call), and truncation counts.

        Prompts and responses become judge text through `core.formats.render`, as in the judge and reward functions.
        """
        sources, candidates = [], []
        for k, (prompt, resp) in enumerate(zip(prompts, responses)):
            texts = [render(prompt, r, name=f"response {i} of row {first_index + k}",
                            conversation_format=self.conversation_format) for i, r in enumerate(resp)]
            sources.append(texts[0][0])
            candidates.append([candidate for _, candidate in texts])
        matrices = self.pairrm.pairwise_matrices(
            sources, candidates, batch_size=self.scoring_batch_size, show_progress_bar=False
        )
        triples = [
            (s, c[i], c[j]) for s, c in zip(sources, candidates) for i in range(len(c)) for j in range(i + 1, len(c))
        ]
        stats = LabelStats(scored_pairs=len(triples))
        if triples:
            stats.truncated_pairs = round(self.pairrm.backend.truncation_rate(triples) * len(triples))
        return matrices, stats

    def aggregate(self, matrix: np.ndarray) -> np.ndarray:
        """One score per response from a single-order pairwise matrix, by `aggregation`."""
        return aggregate(matrix, self.aggregation, self.probability_temperature)

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
            finished = [is_finished(r) for r in resp]
            stats.unfinished += finished.count(False)
            pairs, ties, below = select_pairs(
                scores, self.strategy, self.pairs_per_prompt, self.margin_threshold, rng,
                None if self.allow_unfinished_chosen else finished, [len(r) for r in resp], self.len_penalty)
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
                    "finished": finished,
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

        Args:
            dataset: prompts in `prompt_column` (and responses in `responses_column` when given).
            work_dir: keep each finished chunk of `chunk_size` prompts there; a later call resumes from the intact
                chunks of the same run (see `store`). Chunks of another run are refused unless `overwrite=True`.
            show_progress: a progress bar (default: `core.progress.progress_enabled`: more than one chunk, and stderr
                is a terminal or logging is at INFO or lower).

        Returns:
            The preference dataset (every process under `accelerate launch` gets the merged result).
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        conversational = self._check_dataset(dataset)
        if self.sampler is not None:  # before any generation: a prompt longer than the policy's context is refused
            self.sampler.check_lengths(dataset[self.prompt_column], self.dataset_name)
        features = self._features(dataset, conversational)
        state = _process_state()
        n_chunks = math.ceil(len(dataset) / chunk_size)
        store = ChunkStore(work_dir, self.identity(dataset, chunk_size)) if work_dir is not None else None
        try:
            return self._label_all(dataset, store, n_chunks, chunk_size, features, state, overwrite, show_progress)
        finally:
            if store is not None:
                store.close()

    def _label_all(self, dataset: Dataset, store: ChunkStore | None, n_chunks: int, chunk_size: int,
                   features: Features, state: Any, overwrite: bool, show_progress: bool | None) -> Dataset:
        done = store.open(state, overwrite) if store is not None else set()
        pending = [i for i in range(n_chunks) if i not in done]
        mine = [int(i) for i in np.array_split(np.array(pending, dtype=int), state.num_processes)[state.process_index]]
        if done:
            logger.info("Resuming from %s: %d of %d chunks already done", store.directory, len(done), n_chunks)
        show_progress = progress_enabled(show_progress, len(mine), logger)
        results: list[tuple[int, pa.Table, LabelStats]] = []
        total = sum(min(chunk_size, len(dataset) - i * chunk_size) for i in mine)
        running = LabelStats()
        hide = not (show_progress and state.is_main_process)
        with tqdm(total=total, unit="prompt", desc="label", disable=hide) as bar:
            for index in mine:
                table, stats = self._label_chunk(dataset, index, chunk_size, features)
                if store is not None:
                    store.write(index, table, stats)
                else:
                    results.append((index, table, stats))
                running.add(stats)
                bar.set_postfix(pairs=running.pairs, ties=running.ties_dropped, refresh=False)
                bar.update(stats.prompts)
        state.wait_for_everyone()
        if store is not None:
            results = [(i, *store.read(i)) for i in range(n_chunks)]
        elif state.num_processes > 1:
            from accelerate.utils import gather_object

            results = sorted(gather_object(results), key=lambda item: item[0])
        self.stats = LabelStats()
        for _, _, stats in results:
            self.stats.add(stats)
        schema = features.arrow_schema
        tables = [table.replace_schema_metadata(schema.metadata) for _, table, _ in results] or [schema.empty_table()]
        return Dataset(pa.concat_tables(tables))

    def identity(self, dataset: Dataset, chunk_size: int) -> dict[str, Any]:
        """Everything a labeling run's numbers depend on: a run with another identity never reuses saved chunks.

        The judge's `PairBackend.identity()` (all weights, dtype, template, tokenizer), the sampler's (policy,
        backend, K, every sampling field), the selection settings, and a digest of the input data.
        """
        digest = hashlib.sha256()
        columns = [c for c in (self.prompt_column, self.responses_column) if c is not None]
        for batch in dataset.select_columns(columns).iter(batch_size=1024):
            digest.update(json.dumps(batch, sort_keys=True, ensure_ascii=False).encode())
        return {
            "format": WORK_FORMAT,
            "data": {"rows": len(dataset), "sha256": digest.hexdigest(), "chunk_size": chunk_size,
                     "prompt_column": self.prompt_column, "responses_column": self.responses_column},
            "judge": self.pairrm.backend.identity(),
            "generation": self.sampler.identity() if self.sampler else None,
            "selection": {"aggregation": self.aggregation, "strategy": self.strategy,
                          "pairs_per_prompt": self.pairs_per_prompt, "margin_threshold": self.margin_threshold,
                          "allow_unfinished_chosen": self.allow_unfinished_chosen, "len_penalty": self.len_penalty,
                          "conversation_format": self.conversation_format,
                          "probability_temperature": self.probability_temperature, "seed": self.seed},
        }

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

    def _check_dataset(self, dataset: Dataset) -> bool:
        """Validate columns; return whether prompts are conversational (message lists)."""
        if not isinstance(dataset, Dataset):
            raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
        check_columns(dataset, prompt_column=self.prompt_column, responses_column=self.responses_column)
        if len(dataset) == 0:
            return False
        check_prompts(dataset[self.prompt_column], self.dataset_name, self.prompt_column)
        return isinstance(dataset[0][self.prompt_column], list)

    def _features(self, dataset: Dataset, conversational: bool) -> Features:
        completion = List(_MESSAGE) if conversational else Value("string")
        prompt = dataset.features[self.prompt_column] if len(dataset) else Value("string")
        return Features({
            "prompt": prompt, "chosen": completion, "rejected": completion,
            "score_chosen": Value("float64"), "score_rejected": Value("float64"), "margin": Value("float64"),
            "chosen_probs": Value("float64"), "chosen_probs_win": Value("float64"),
            "chosen_probs_lose": Value("float64"),
            "all_generated_responses": List(Value("string")), "all_rm_scores": List(Value("float64")),
            "finished": List(Value("bool")), "prompt_index": Value("int64"),
        })


def check_columns(dataset: Dataset, source: str = "dataset", **columns: str | None) -> None:
    """ValueError naming the flag (`--prompt_column`), the value, `source` and the dataset's columns when a named
    column is not in `dataset` (`pairrm_rlhf.data.require_columns`)."""
    require_columns(dataset.column_names, columns, source)


def best_of_n_responses(
    pairrm: PairRM, policy: Any, tokenizer: Any, prompts: list[Any], n: int = 4, *, aggregation: str = "rank",
    seed: int = 0, sampling: SamplingArguments | None = None, **sampling_fields: Any,
) -> list[dict[str, Any]]:
    """Best-of-n at inference, keeping the evidence: per prompt `{"best", "responses", "scores"}`.

    Unlike `PairRM.best_of_n_generate` (which returns only the best string), prompts may be message lists
    (rendered with the chat template) and every sample comes back with its score. Sampling is `sampling`, or
    `SamplingArguments(**sampling_fields)` (e.g. `max_new_tokens=64, temperature=0.7`).
    """
    if n < 2:
        raise ValueError(f"n must be >= 2 for best-of-n, got {n}")
    labeler = PreferenceLabeler(pairrm, policy, tokenizer, num_responses=n, aggregation=aggregation, seed=seed,
                                sampling=sampling or SamplingArguments(**sampling_fields))
    responses = labeler.generate(list(prompts), seed)
    scores = labeler.rank_responses(list(prompts), responses)
    return [
        {"best": r[int(np.argmax(s))], "responses": r, "scores": [float(x) for x in s]}
        for r, s in zip(responses, scores)
    ]


# ---- helpers ---------------------------------------------------------------------------------------------
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


def _process_state() -> Any:
    """accelerate's process state; on a machine without CUDA, processes talk through gloo on the CPU."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _chunk_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
