"""TRL reward functions over PairRM.

- `PairwiseReward` / `AsyncPairwiseReward`: GRPO/RLOO rewards, against a reference column or round-robin within
  each prompt's group of generations.
- `OnlineDPOJudgeReward`: makes OnlineDPOTrainer's chosen sample the one PairRM prefers.
- `pairrm_reference_reward`, `pairrm_group_reward`: module-level functions for TRL's CLI
  (`--reward_funcs pairrm_rlhf.trl.rewards.pairrm_reference_reward`), configured by environment variables, which
  are checked when TRL looks the function up (`check_reward_environment`).

All of them are plain callables (TRL treats `nn.Module`s as sequence-classification models) and load the model on
first call. Text is rendered by `core.formats.render`, the same as the judge.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from ..core import aggregation
from ..core.assets import DEFAULT_MODEL
from ..core.engine import default_device
from ..core.formats import CONVERSATION_FORMATS, render
from ..core.settings import check_choice
from ..pairrm import LazyPairRM, PairRM
from .judge import PairRMJudge, renamed_argument

logger = logging.getLogger(__name__)

REWARD_OUTPUTS = ("probability", "logit", "win")  # what `PairwiseReward(output=...)` returns per completion
REWARD_MODES = ("reference", "group")  # what `PairwiseReward(mode=...)` compares each completion with
ENV_VARS = ("PAIRRM_MODEL", "PAIRRM_DEVICE", "PAIRRM_DTYPE", "PAIRRM_BASE_MODEL")
_TRL_KWARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")


def _check_rows(prompts: Any, completions: Any) -> tuple[list, list]:
    for name, values in (("prompts", prompts), ("completions", completions)):
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise TypeError(f"{name} must be a list, got {type(values).__name__}")
    if len(prompts) != len(completions):
        raise ValueError(f"completions has {len(completions)} items but prompts has {len(prompts)}")
    return list(prompts), list(completions)


# ---- OnlineDPO -----------------------------------------------------------------------------------------
class OnlineDPOJudgeReward:
    """Reward function for `trl.experimental.online_dpo.OnlineDPOTrainer` that judges each pair with PairRM.

    The trainer calls it with `prompts = 2 * prompts` (rows i and B+i are the two samples of prompt i) and keeps as
    chosen the first sample when reward(first) >= reward(second). Soft mode returns (P, 1 - P) with P the
    calibrated probability that the first is better, hard mode (1, 0) or (0, 1) by the judge's decision (ties go to
    the first, as the trainer's `>=` rule does). Either way the chosen sample is PairRM's preferred one, unless
    the trainer's `missing_eos_penalty` (subtracted from these rewards) overrides it. Synchronous on purpose:
    OnlineDPO does not await reward functions.
    """

    def __init__(
        self,
        pairrm: PairRMJudge | PairRM | LazyPairRM | str | os.PathLike = DEFAULT_MODEL,
        *,
        soft: bool = True,
        temperature: float = 1.0,
        name: str = "pairrm_judge",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        base_model: str | os.PathLike | None = None,
        batch_size: int | None = None,
        judge: PairRMJudge | PairRM | LazyPairRM | str | os.PathLike | None = None,
    ):
        pairrm = renamed_argument(type(self).__name__, pairrm, judge, "judge", default=DEFAULT_MODEL)
        if isinstance(pairrm, PairRMJudge):
            if any(v is not None for v in (device, dtype, base_model, batch_size)):
                raise ValueError("device, dtype, base_model and batch_size apply only when pairrm is not a PairRMJudge")
            self.judge = pairrm
        else:
            self.judge = PairRMJudge(pairrm, device=device, dtype=dtype, base_model=base_model, batch_size=batch_size)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.soft = soft
        self.temperature = temperature
        self.__name__ = name

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        prompts, completions = _check_rows(prompts, completions)
        if len(prompts) % 2:
            raise ValueError(
                f"prompts has {len(prompts)} rows; OnlineDPOTrainer's block layout has 2 * B rows "
                "(prompts = 2 * prompts)"
            )
        b = len(prompts) // 2
        for i in range(b):
            if prompts[i] != prompts[b + i]:
                raise ValueError(
                    f"prompts[{i}] and prompts[{b + i}] differ; expected OnlineDPOTrainer's block layout "
                    "(prompts = 2 * prompts, rows i and B+i are two samples of one prompt)"
                )
        z = self.judge.two_order_logits(prompts[:b], [[completions[i], completions[b + i]] for i in range(b)])
        if self.soft:
            first = aggregation.probability(z, self.temperature)
        else:
            first = (z >= 0).astype(np.float32)
        return [float(v) for v in first] + [float(v) for v in (1 - first)]


# ---- PairwiseReward ------------------------------------------------------------------------------------
class PairwiseReward:
    """TRL reward function (`reward(prompts, completions, **columns) -> list[float]`) from PairRM comparisons.

    Args:
        pairrm: a `PairRM`, a checkpoint id or path (loaded on first call), or a `LazyPairRM` to share one model.
            `model=` is its deprecated name.
        mode: `"reference"`: compare each completion with its row's reference(s) from `reference_column` (a
            string, or a list of strings: compared with each and averaged). `"group"`: round-robin among the
            completions of the same prompt (GRPO/RLOO groups); no column needed.
        output: `"probability"` (default): P(completion better) = sigmoid(z / (2 T)) with z the two-order logit;
            in group mode the mean P(win) against the others. `"logit"`: z against the reference (averaged); in
            group mode the reference `rank` score (1/N) sum_j z_ij. `"win"`: 1 / 0.5 / 0 for win / tie / loss,
            averaged likewise.
        temperature: T of the probability output.
        group_size: group mode: rows per group (TRL's `num_generations`). Default: each run of consecutive rows
            with an equal prompt is a group (two adjacent groups of the same prompt then merge).
        gather: group mode under `torch.distributed`: gather the rows of all processes so groups split across
            processes are scored whole (every process must call the reward at the same time, as TRL does).
        name: `__name__`, which TRL uses in its logs (default `pairrm_reference` / `pairrm_group`).
        eos_token_ids: the policy's EOS id(s) (TRL's GRPO/RLOO use the tokenizer's EOS plus the generation config's).
            When set, the reward reads the `completion_ids` TRL passes and subtracts `missing_eos_penalty` from every
            completion whose last id is not one of them (cut at `max_completion_length`): PairRM prefers longer
            text, so unpenalised truncation teaches rambling. Include the pad id if your pad token is not an EOS.
        missing_eos_penalty: subtracted from an unfinished completion's reward (default 1.0: with the
            `probability` or `win` output, in [0, 1], an unfinished completion then scores <= 0 <= any finished
            one; with `logit`, choose it on the scale of z). A penalty rather than None, because TRL turns None
            into NaN and an all-NaN row gets advantage 0: None would ignore truncation instead of discouraging it.
        conversation_format: `"pairrm"` (llm-blender's multi-turn format for every conversation) or `"plain"`
            (a single-turn conversation as plain text: the user text and the bare response, as SPPO labelled; see
            `core.formats.render`).
        device, dtype, base_model: passed to `PairRM.from_pretrained` when `pairrm` is an id or path.

    Reference mode: a row whose reference is None (or an empty list) gets None, TRL's "not applicable", so the
    reward can share a multi-task dataset with other rewards (TRL nansums the rewards of a row). It logs the mean
    win rate (ties count 1/2) of the rows with a reference as `{name}/win_rate` through TRL's `log_metric`.
    """

    def __init__(
        self,
        pairrm: PairRM | LazyPairRM | str | os.PathLike | None = None,
        *,
        reference_column: str = "reference",
        output: str = "probability",
        mode: str = "reference",
        temperature: float = 1.0,
        batch_size: int | None = None,
        group_size: int | None = None,
        gather: bool = True,
        name: str | None = None,
        eos_token_ids: int | Sequence[int] | None = None,
        missing_eos_penalty: float = 1.0,
        conversation_format: str = "pairrm",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        base_model: str | os.PathLike | None = None,
        model: PairRM | LazyPairRM | str | os.PathLike | None = None,
    ):
        if output not in REWARD_OUTPUTS:
            raise ValueError(f"output must be one of {REWARD_OUTPUTS}, got {output!r}")
        if mode not in REWARD_MODES:
            raise ValueError(f"mode must be one of {REWARD_MODES}, got {mode!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
        if isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        if eos_token_ids is not None and (
                not eos_token_ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in eos_token_ids)):
            raise ValueError(f"eos_token_ids must be an int or a non-empty list of ints, got {eos_token_ids!r}")
        if not missing_eos_penalty >= 0:
            raise ValueError(f"missing_eos_penalty must be >= 0, got {missing_eos_penalty}")
        check_choice("conversation_format", conversation_format, CONVERSATION_FORMATS)
        pairrm = renamed_argument(type(self).__name__, pairrm, model, "model")
        self._lazy = LazyPairRM.wrap(pairrm, device=device, dtype=dtype, base_model=base_model)
        self.reference_column = reference_column
        self.output = output
        self.mode = mode
        self.temperature = temperature
        self.batch_size = batch_size
        self.group_size = group_size
        self.gather = gather
        self.eos_token_ids = None if eos_token_ids is None else frozenset(eos_token_ids)
        self.missing_eos_penalty = float(missing_eos_penalty)
        self.conversation_format = conversation_format
        self.__name__ = name or f"pairrm_{mode}"

    @property
    def pairrm(self) -> PairRM:
        """The underlying `PairRM` (loaded on first access)."""
        return self._lazy.get()

    def __call__(
        self, prompts: list, completions: list, log_metric: Callable[[str, float], None] | None = None, **kwargs: Any
    ) -> list[float | None]:
        prompts, completions = _check_rows(prompts, completions)
        unfinished = self._unfinished(kwargs.get("completion_ids"), len(completions))
        if self.mode == "group":
            rewards: list[float | None] = list(self._group(prompts, completions))
        else:
            rewards = self._reference(prompts, completions, kwargs, log_metric)
        if unfinished is not None and log_metric is not None and len(unfinished):
            log_metric(f"{self.__name__}/unfinished_rate", float(np.mean(unfinished)))
        if unfinished is None:
            return rewards
        return [r if r is None or not cut else r - self.missing_eos_penalty for r, cut in zip(rewards, unfinished)]

    def _unfinished(self, completion_ids: Any, n: int) -> list[bool] | None:
        """Which completions did not end with an EOS id (None when `eos_token_ids` is not set)."""
        if self.eos_token_ids is None:
            return None
        if completion_ids is None:
            raise ValueError(
                f"{self.__name__}: eos_token_ids is set but no completion_ids were passed (TRL's GRPO/RLOO pass them; "
                "called directly, pass completion_ids=[[token ids], ...])")
        if isinstance(completion_ids, (str, bytes)) or not isinstance(completion_ids, Sequence) \
                or len(completion_ids) != n:
            size = len(completion_ids) if isinstance(completion_ids, Sequence) else type(completion_ids).__name__
            raise ValueError(f"completion_ids must be a list with one id list per completion ({n}), got {size}")
        return [not (len(ids) and int(ids[-1]) in self.eos_token_ids) for ids in completion_ids]

    # ---- reference mode ---------------------------------------------------------------------------------
    def _reference(self, prompts: list, completions: list, columns: dict,
                   log_metric: Callable | None) -> list[float | None]:
        column = self.reference_column
        if column not in columns:
            given = sorted(k for k in columns if k not in _TRL_KWARGS)
            raise ValueError(
                f"PairwiseReward(mode='reference') needs the dataset column {column!r} (TRL passes columns as keyword "
                f"arguments); got columns {given}. Set reference_column=... or use mode='group'."
            )
        references = columns[column]
        if isinstance(references, str) or not isinstance(references, Sequence):
            raise TypeError(f"{column} must be a list with one entry per completion, got {type(references).__name__}")
        if len(references) != len(prompts):
            raise ValueError(f"{column} has {len(references)} items but prompts has {len(prompts)}")
        triples, owner = [], []
        for i, (prompt, completion, refs) in enumerate(zip(prompts, completions, references)):
            row_refs = _references(f"{column}[{i}]", refs)
            if not row_refs:
                continue  # no reference: not applicable (None)
            source, candidate = render(prompt, completion, name=f"completions[{i}]",
                                       conversation_format=self.conversation_format)
            for j, ref in enumerate(row_refs):
                triples.append((source, candidate, render(prompt, ref, name=f"{column}[{i}][{j}]",
                                                          conversation_format=self.conversation_format)[1]))
                owner.append(i)
        if not triples:
            return [None] * len(prompts)
        z = self.pairrm.two_order_logits(triples, batch_size=self.batch_size)
        counts = np.bincount(owner, minlength=len(prompts))
        scored = counts > 0
        sums = np.bincount(owner, weights=self._values(z), minlength=len(prompts))
        if log_metric is not None:
            wins = np.bincount(owner, weights=_wins(z), minlength=len(prompts))[scored] / counts[scored]
            log_metric(f"{self.__name__}/win_rate", float(wins.mean()))
        return [float(sums[i] / counts[i]) if scored[i] else None for i in range(len(prompts))]

    def _values(self, z: np.ndarray) -> np.ndarray:
        if self.output == "probability":
            return aggregation.probability(z, self.temperature).astype(np.float64)
        if self.output == "win":
            return _wins(z)
        return np.asarray(z, dtype=np.float64)

    # ---- group mode -------------------------------------------------------------------------------------
    def _group(self, prompts: list, completions: list) -> list[float]:
        local = list(zip(prompts, completions))
        offset, rows = _gather_rows(local) if self.gather else (0, local)
        end = offset + len(prompts)
        # the groups that hold some of this process's rows
        spans = [(s, e) for s, e in self._spans([p for p, _ in rows]) if s < end and e > offset]
        if not spans:
            return []
        sources, candidates = [], []
        for s, e in spans:
            rendered = [render(rows[k][0], rows[k][1], name=f"completions[{k}]",
                               conversation_format=self.conversation_format) for k in range(s, e)]
            sources.append(rendered[0][0])
            candidates.append([c for _, c in rendered])
        matrices = self.pairrm.pairwise_matrices(sources, candidates, batch_size=self.batch_size)
        scores = np.zeros(len(rows))
        for (s, e), matrix in zip(spans, matrices):
            scores[s:e] = self._group_scores(matrix)
        return [float(v) for v in scores[offset:end]]

    def _group_scores(self, matrix: np.ndarray) -> np.ndarray:
        """Each completion's score from M[i, j] = f(x, c_i, c_j) of its group."""
        if self.output == "logit":
            return aggregation.round_robin_scores(matrix).astype(np.float64)  # the reference `rank` score
        z = np.asarray(matrix, dtype=np.float64) - np.asarray(matrix, dtype=np.float64).T  # two-order logits
        n = len(matrix)
        if n == 1:
            return np.full(1, 0.5)
        values = self._values(z)
        np.fill_diagonal(values, 0.0)
        return values.sum(axis=1) / (n - 1)

    def _spans(self, prompts: list) -> list[tuple[int, int]]:
        n = len(prompts)
        if self.group_size is None:
            starts = [k for k in range(n) if k == 0 or prompts[k] != prompts[k - 1]]
            return list(zip(starts, starts[1:] + [n]))
        size = self.group_size
        if n % size:
            raise ValueError(
                f"group mode with group_size={size} got {n} rows in all (over all processes): not a multiple")
        for s in range(0, n, size):
            for k in range(s + 1, s + size):
                if prompts[k] != prompts[s]:
                    raise ValueError(
                        f"rows {s}..{s + size - 1} form one group (group_size={size}) but prompt of row {k} differs "
                        f"from row {s}; TRL lays out each prompt's generations consecutively"
                    )
        return [(s, s + size) for s in range(0, n, size)]


class AsyncPairwiseReward(PairwiseReward):
    """`PairwiseReward` as a coroutine function, for trainers that await async rewards (GRPO, RLOO): scoring runs in
    a worker thread so the event loop (and other async rewards) keep running. Not for OnlineDPO, which does not await.
    """

    async def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:  # type: ignore[override]
        return await asyncio.to_thread(PairwiseReward.__call__, self, prompts, completions, **kwargs)


def _references(name: str, refs: Any) -> list:
    """A row's references: a string, a message list, or a list of those; [] for a row without one (None or [])."""
    if refs is None:
        return []
    if isinstance(refs, str) or (isinstance(refs, Sequence) and refs and all(isinstance(m, dict) for m in refs)):
        return [refs]
    if isinstance(refs, Sequence) and not isinstance(refs, (bytes, dict)):
        for j, ref in enumerate(refs):
            if ref is None:
                raise ValueError(f"{name}[{j}] is None: every reference must be a string")
            if not isinstance(ref, (str, Sequence)):
                raise TypeError(f"{name}[{j}] must be a string (or a message list), got {type(ref).__name__}")
        return list(refs)
    raise TypeError(f"{name} must be a string or a list of strings, got {type(refs).__name__}")


def policy_eos_token_ids(policy: Any, tokenizer: Any) -> list[int]:
    """The ids that end a completion as TRL's GRPO/RLOO count them for `mask_truncated_completions`: the policy's
    generation-config EOS id(s), the tokenizer's EOS id, and the pad id (TRL's `eos_and_pad`)."""
    config = getattr(policy, "generation_config", None)  # a bare nn.Module has none: the tokenizer's ids then
    eos = None if config is None else config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    for extra in (tokenizer.eos_token_id, tokenizer.pad_token_id):
        if extra is not None and extra not in ids:
            ids.append(extra)
    if not ids:
        raise ValueError("the policy's generation config and tokenizer define no EOS id: set eos_token_id")
    return ids


def _wins(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return (z > 0) + 0.5 * (z == 0)


def _gather_rows(rows: list) -> tuple[int, list]:
    """All processes' rows in process order (TRL's global order) and where this process's rows start."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0, rows
    parts: list = [None] * dist.get_world_size()
    # NCCL object collectives use the calling thread's current CUDA device; async rewards run in worker threads,
    # whose current device is cuda:0 on every process, so pin this process's device.
    with torch.cuda.device(default_device()) if torch.cuda.is_available() else nullcontext():
        dist.all_gather_object(parts, rows)
    offset = sum(len(part) for part in parts[: dist.get_rank()])
    return offset, [row for part in parts for row in part]


# ---- TRL CLI --------------------------------------------------------------------------------------------
_env_lock = threading.Lock()
_env_models: dict[tuple, LazyPairRM] = {}
_env_rewards: dict[tuple, PairwiseReward] = {}


def _env_reward(mode: str, name: str) -> PairwiseReward:
    """A shared reward for the current environment: `PAIRRM_MODEL` (default `llm-blender/PairRM-hf`),
    `PAIRRM_DEVICE`, `PAIRRM_DTYPE`, `PAIRRM_BASE_MODEL`; one model per distinct setting, loaded on first use."""
    env = tuple(os.environ.get(key) or None for key in ENV_VARS)
    with _env_lock:
        if env not in _env_models:
            _env_models[env] = LazyPairRM(env[0] or DEFAULT_MODEL, device=env[1], dtype=env[2], base_model=env[3])
        if (env, mode) not in _env_rewards:
            _env_rewards[env, mode] = PairwiseReward(_env_models[env], mode=mode, name=name)
        return _env_rewards[env, mode]


def _reference_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """P(completion better than the row's `reference` column) by PairRM; for TRL's CLI
    (`--reward_funcs pairrm_rlhf.trl.rewards.pairrm_reference_reward`). Model from the `PAIRRM_*` environment."""
    return _env_reward("reference", "pairrm_reference_reward")(prompts, completions, **kwargs)


def _group_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """Mean P(win) of each completion against the others of its prompt's group, by PairRM; for TRL's CLI
    (`--reward_funcs pairrm_rlhf.trl.rewards.pairrm_group_reward`). Model from the `PAIRRM_*` environment."""
    return _env_reward("group", "pairrm_group_reward")(prompts, completions, **kwargs)


# TRL names a reward's metrics by `__name__`; the public names are looked up through `__getattr__` below.
_reference_reward.__name__ = _reference_reward.__qualname__ = "pairrm_reference_reward"
_group_reward.__name__ = _group_reward.__qualname__ = "pairrm_group_reward"
CLI_REWARDS = {"pairrm_reference_reward": _reference_reward, "pairrm_group_reward": _group_reward}


def check_reward_environment() -> None:
    """A one-line error naming the variable when the `PAIRRM_*` environment cannot give a judge: a missing local
    path, a hub id that is not cached under HF_HUB_OFFLINE (also the default when PAIRRM_MODEL is unset), a device
    this machine lacks. Nothing is loaded."""
    from ..core.assets import TINY, check_local
    from ..core.entry import check_device, check_hub_id

    model = os.environ.get("PAIRRM_MODEL") or None
    if model is not None and model != TINY:
        check_local(model, "PAIRRM_MODEL")
    check_hub_id(model or DEFAULT_MODEL, "PAIRRM_MODEL" if model else "PAIRRM_MODEL is not set and its default")
    check_hub_id(os.environ.get("PAIRRM_BASE_MODEL") or None, "PAIRRM_BASE_MODEL")
    check_device(os.environ.get("PAIRRM_DEVICE") or None, "PAIRRM_DEVICE")


def __getattr__(name: str) -> Any:
    """`pairrm_reference_reward` and `pairrm_group_reward`, checked when they are looked up: TRL's CLI does
    `getattr(module, name)` while it builds the trainer, so an unusable `PAIRRM_*` environment fails there, with what
    to set, instead of at the first training step when the judge would load."""
    if name in CLI_REWARDS:
        check_reward_environment()
        return CLI_REWARDS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
