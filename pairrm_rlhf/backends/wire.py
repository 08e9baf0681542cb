"""The wire format of `pairrm-rlhf serve`, shared by the server (`serve.app`) and its client (`backends.remote`).

One typed model per request and answer, each with `to_json` (what is sent) and a parser (what is accepted), so the
two sides cannot drift and neither re-parses dict literals by hand. Parsers trust nothing: an answer that is not
exactly the declared shape (a list of `n` finite JSON numbers, a string template, ...) is a `WireError` naming
where it came from, as the in-process engine refuses non-finite logits.

No HTTP library here: the server and the client each bring their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.backend import Triple
from ..core.formats import Rendered

WIRE_FIELDS = ("messages", "response")  # what a `Rendered` text carries besides its PairRM text
IDEMPOTENCY_HEADER = "Idempotency-Key"  # a retry with the same key joins the running computation
TEMPLATES = ("pairrm", "better-pairrm", "rlhflow")
DEFAULT_PROBABILITY = "sigmoid(z/2T)"  # the rule `PairBackend.reference_probability` returning None stands for
OWN_PROBABILITY = "server"  # the served judge has its own rule: ask POST /reference_probability


class WireError(ValueError):
    """A server's answer is not what the wire format declares."""


def to_wire(text: str) -> str | dict:
    """A triple's text for JSON: a plain string, or `{"text": ..., <what it was rendered from>}` for a `Rendered`."""
    if isinstance(text, Rendered):
        extra = {k: getattr(text, k) for k in WIRE_FIELDS if getattr(text, k) is not None}
        return {"text": str(text), **extra} if extra else str(text)
    return str(text)


def from_wire(name: str, value: Any) -> str:
    """The inverse of `to_wire`; a ValueError naming `name` when `value` is neither form."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        extra = {k: v for k, v in value.items() if k != "text"}
        unknown = set(extra) - set(WIRE_FIELDS)
        if unknown:
            raise ValueError(f"{name} has unknown keys {sorted(unknown)}; expected text, {', '.join(WIRE_FIELDS)}")
        messages = extra.get("messages")
        if messages is not None:
            if not (
                isinstance(messages, list)
                and all(isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m) for m in messages)
            ):
                raise ValueError(f"{name}.messages must be a list of [role, content] string pairs")
            extra["messages"] = tuple(tuple(m) for m in messages)
        if extra.get("response") is not None and not isinstance(extra["response"], str):
            raise ValueError(f"{name}.response must be a string")
        return Rendered(value["text"], **extra)
    raise ValueError(f"{name} must be a string or an object with a string `text`")


# ---- checks of answers ---------------------------------------------------------------------------------------
def _show(value: Any) -> str:
    return repr(value)[:80]


def finite_number(where: str, value: Any) -> float:
    """`value` as a float when it is a finite JSON number (not a bool, not a string), else a `WireError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WireError(f"{where}: expected a number, got {_show(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise WireError(f"{where}: expected a finite number, got {_show(value)}")
    return number


def finite_numbers(where: str, value: Any, count: int, noun: str = "numbers") -> np.ndarray:
    """`value` as a float64 array when it is a flat list of exactly `count` finite numbers, else a `WireError`."""
    if not isinstance(value, list):
        raise WireError(f"{where}: expected a list of {count} {noun}, got {_show(value)}")
    if len(value) != count:
        raise WireError(f"{where}: expected {count} {noun}, got {len(value)}")
    return np.array([finite_number(f"{where}[{i}]", v) for i, v in enumerate(value)], dtype=np.float64)


def _field(where: str, answer: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(answer, dict):
        raise WireError(f"{where}: expected a JSON object, got {_show(answer)}")
    value = answer.get(key)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise WireError(f"{where}: `{key}` must be {getattr(kind, '__name__', kind)}, got {_show(value)}")
    return value


# ---- requests ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TriplesRequest:
    """POST /pair_logits, /truncation_rate, /reference_probability: prepared (source, A, B) triples.

    `two_order` (/pair_logits only): f(x,A,B) - f(x,B,A) instead of f(x,A,B). `temperature`
    (/reference_probability only): T of the served judge's own P(A > B)."""

    triples: Sequence[Triple]
    two_order: bool = False
    temperature: float | None = None

    def to_json(self) -> dict:
        body: dict = {"triples": [[to_wire(text) for text in triple] for triple in self.triples]}
        if self.two_order:
            body["two_order"] = True
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body

    @classmethod
    def from_fields(cls, fields: dict) -> TriplesRequest:
        """From a body whose field names and scalar types the server has checked (`serve.limits.fields`)."""
        raw = fields["triples"]
        if not isinstance(raw, list):
            raise ValueError(f"triples must be a list, got {type(raw).__name__}")
        triples = []
        for i, triple in enumerate(raw):
            if not (isinstance(triple, list) and len(triple) == 3):
                raise ValueError(f"triples[{i}] must be a list of 3 texts [source, A, B]")
            triples.append(tuple(from_wire(f"triples[{i}][{k}]", text) for k, text in enumerate(triple)))
        return cls(triples, fields.get("two_order", False), fields.get("temperature"))


# ---- answers -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LogitsAnswer:
    """The answer of POST /pair_logits: one logit per triple."""

    logits: list[float]

    def to_json(self) -> dict:
        return {"logits": self.logits}

    @staticmethod
    def parse(answer: Any, count: int) -> np.ndarray:
        return finite_numbers("`logits`", _field("the answer", answer, "logits", list), count, "logits")


@dataclass(frozen=True)
class ProbabilityAnswer:
    """The answer of POST /reference_probability: the served judge's own P(A > B) per triple, or null where the
    default sigmoid((f(x,A,B) - f(x,B,A)) / 2T) applies (`PairBackend.reference_probability` returning None)."""

    probabilities: list[float] | None

    def to_json(self) -> dict:
        return {"probabilities": self.probabilities}

    @staticmethod
    def parse(answer: Any, count: int) -> np.ndarray | None:
        if isinstance(answer, dict) and "probabilities" in answer and answer["probabilities"] is None:
            return None
        p = finite_numbers(
            "`probabilities`", _field("the answer", answer, "probabilities", list), count, "probabilities"
        )
        if ((p < 0) | (p > 1)).any():
            raise WireError(f"`probabilities`: a probability outside [0, 1]: {_show(p[(p < 0) | (p > 1)][0])}")
        return p


@dataclass(frozen=True)
class TruncationAnswer:
    """The answer of POST /truncation_rate."""

    truncation_rate: float

    def to_json(self) -> dict:
        return {"truncation_rate": self.truncation_rate}

    @staticmethod
    def parse(answer: Any) -> float:
        rate = finite_number("`truncation_rate`", _field("the answer", answer, "truncation_rate", (int, float)))
        if not 0 <= rate <= 1:
            raise WireError(f"`truncation_rate` must be in [0, 1], got {rate!r}")
        return rate


@dataclass(frozen=True)
class ServerInfo:
    """GET /health: what the served judge is (so a client renders and limits exactly as in process) and counters.

    Attributes:
        identity: the served backend's `identity()` (weights digest, dtype, template, tokenizer, ...).
        template: how prompts are rendered for it (`pairrm`, `better-pairrm`, `rlhflow`).
        dtype: its compute dtype (`float32`, `bfloat16`, ...).
        max_batch_tokens: tokens in one engine batch. max_pairs, max_request_tokens, max_body_bytes: per request.
        probability: `sigmoid(z/2T)` (the default rule) or `server` (ask POST /reference_probability).
        counters: the queue's counters (requests, batches, pairs, tokens, engine_s, queued pairs/tokens, ...).
    """

    identity: dict
    template: str
    dtype: str
    max_batch_tokens: int
    max_pairs: int
    max_request_tokens: int
    max_body_bytes: int
    probability: str
    counters: dict

    LIMITS = ("max_batch_tokens", "max_pairs", "max_request_tokens", "max_body_bytes")

    def to_json(self) -> dict:
        return {
            "status": "ok",
            "identity": self.identity,
            "template": self.template,
            "dtype": self.dtype,
            "limits": {name: getattr(self, name) for name in self.LIMITS},
            "probability": self.probability,
            **self.counters,
        }

    @classmethod
    def parse(cls, where: str, answer: Any) -> ServerInfo:
        if _field(where, answer, "status", str) != "ok":
            raise WireError(f"{where}: status is {_show(answer['status'])}, not 'ok'")
        identity = _field(where, answer, "identity", dict)
        template = _field(where, answer, "template", str)
        if template not in TEMPLATES:
            raise WireError(f"{where}: unknown template {_show(template)}; this client knows {', '.join(TEMPLATES)}")
        probability = _field(where, answer, "probability", str)
        if probability not in (DEFAULT_PROBABILITY, OWN_PROBABILITY):
            raise WireError(f"{where}: unknown probability rule {_show(probability)}")
        limits = _field(where, answer, "limits", dict)
        sizes = {name: _field(f"{where} limits", limits, name, int) for name in cls.LIMITS}
        if any(v <= 0 for v in sizes.values()):
            raise WireError(f"{where}: limits must be positive integers, got {limits}")
        counters = {
            k: v
            for k, v in answer.items()
            if k not in ("status", "identity", "template", "dtype", "limits", "probability")
        }
        return cls(
            identity, template, _field(where, answer, "dtype", str), **sizes, probability=probability, counters=counters
        )
