"""`ServeArguments`: the server's own flags (the judge's come from `pairrm_rlhf.args.PairRMArguments`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

TOKEN_ENV = "PAIRRM_SERVER_TOKEN"
OUTPUTS = ("probability", "logit")
CHAT_FORMAT_NAMES = ("auto", "plain", "chatml", "llama3")
DEFAULT_STRIP = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<eos>", "<|end|>"]


@dataclass
class ServeArguments:
    """Serve PairRM over HTTP: OpenRLHF's POST /get_reward and the PairRM API, with a fair batching queue."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (loopback by default)"})
    port: int = field(default=8000, metadata={"help": "port to bind (0: any free port)"})
    token: str | None = field(
        default=None,
        metadata={
            "help": "token for every route but /health, as `Authorization: Bearer` or `?token=` "
            f"(default: ${TOKEN_ENV})"
        },
    )
    # the engine queue
    max_batch_pairs: int = field(default=256, metadata={"help": "most ordered pairs in one engine batch"})
    max_batch_tokens: int | None = field(
        default=None,
        metadata={
            "help": "most tokens in one engine batch, so one batch takes bounded time "
            "(default: 65536 on CUDA, 8192 on CPU)"
        },
    )
    max_wait_ms: float = field(default=5.0, metadata={"help": "longest a request waits for others to join its batch"})
    # limits
    max_body_bytes: int = field(default=16 * 2**20, metadata={"help": "largest request body (413 above)"})
    max_items: int = field(default=4096, metadata={"help": "longest list (or object) anywhere in a request"})
    max_text_chars: int = field(default=100_000, metadata={"help": "longest string anywhere in a request"})
    max_pairs: int = field(default=16384, metadata={"help": "most ordered pairs one request may need (413 above)"})
    max_request_tokens: int | None = field(
        default=None,
        metadata={
            "help": "most tokens (summed over its pairs) one request may need (413 above; default: 4194304 on CUDA, "
            "65536 on CPU, about a minute of work either way)"
        },
    )
    max_json_values: int = field(
        default=2**18,
        metadata={"help": "most JSON values in one body, counted on the raw bytes before parsing (400 above)"},
    )
    max_concurrency: int = field(default=64, metadata={"help": "requests being computed at once (503 above)"})
    max_connections: int = field(
        default=512,
        metadata={"help": "open connections; at the cap the oldest idle one is closed (503 when none is idle)"},
    )
    max_connections_per_client: int = field(
        default=64,
        metadata={"help": "open connections from one client address; at the cap its oldest idle one is closed"},
    )
    allowed_hosts: list[str] = field(
        default_factory=list,
        metadata={
            "help": "host names accepted in the Host header besides IP literals and localhost (DNS rebinding); "
            "* for any"
        },
    )
    orphan_grace_s: float = field(
        default=2.0,
        metadata={
            "help": "how long the work of a gone client waits for a retry with its Idempotency-Key before it is dropped"
        },
    )
    header_timeout_s: float = field(default=10.0, metadata={"help": "time to send a request's headers (408 after)"})
    body_timeout_s: float = field(default=60.0, metadata={"help": "time to send a request's body (408 after)"})
    keep_alive_s: float = field(default=5.0, metadata={"help": "an idle keep-alive connection is closed after this"})
    graceful_timeout_s: int = field(default=60, metadata={"help": "on shutdown, how long in-flight requests may take"})
    access_log: bool = field(default=False, metadata={"help": "log every request (the URL, so a ?token= too)"})
    # /get_reward: query -> (prompt, response), reference, reward
    chat_format: str = field(default="auto", metadata={"help": "auto, chatml, llama3 or plain: how queries are parsed"})
    separator: str | None = field(default=None, metadata={"help": "split each query at the last occurrence of this"})
    split_regex: str | None = field(
        default=None, metadata={"help": "regex with groups (?P<prompt>...) and (?P<response>...), on the whole query"}
    )
    strip_strings: list[str] = field(
        default_factory=lambda: list(DEFAULT_STRIP), metadata={"help": "end-of-turn strings cut from responses"}
    )
    reference: str | None = field(
        default=None, metadata={"help": "reference for every prompt (after --reference_file)"}
    )
    reference_file: str | None = field(
        default=None,
        metadata={"help": "jsonl/json/csv/parquet file or saved dataset with prompt and reference columns"},
    )
    prompt_column: str = field(default="prompt", metadata={"help": "prompt column of --reference_file"})
    reference_column: str = field(default="reference", metadata={"help": "reference column of --reference_file"})
    labels_as_reference: bool = field(default=False, metadata={"help": "use OpenRLHF's `labels` as the reference"})
    output: str = field(default="probability", metadata={"help": "probability (P(response > reference)) or logit"})
    temperature: float = field(default=1.0, metadata={"help": "T of P = sigmoid(z / (2 T))"})

    def __post_init__(self) -> None:
        if self.token == "":
            raise ValueError("--token is empty: pass a non-empty token, or none to serve without authentication")
        if self.token is None and os.environ.get(TOKEN_ENV) == "":
            raise ValueError(f"${TOKEN_ENV} is set but empty: set a non-empty token, or unset it")
        if self.chat_format not in CHAT_FORMAT_NAMES:
            raise ValueError(f"--chat_format must be one of {', '.join(CHAT_FORMAT_NAMES)}; got {self.chat_format!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"--output must be one of {', '.join(OUTPUTS)}; got {self.output!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature < float("inf")):
            raise ValueError(f"--temperature must be a finite number > 0, got {self.temperature!r}")
        for name in (
            "max_batch_pairs",
            "max_body_bytes",
            "max_items",
            "max_text_chars",
            "max_pairs",
            "max_json_values",
            "max_concurrency",
            "max_connections",
            "max_connections_per_client",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int) and value > 0):
                raise ValueError(f"--{name} must be a positive integer, got {value!r}")
        for name in ("max_batch_tokens", "max_request_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not (isinstance(value, int) and value > 0)):
                raise ValueError(f"--{name} must be a positive integer, got {value!r}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"--{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if not 0 <= self.orphan_grace_s < float("inf"):
            raise ValueError(f"--orphan_grace_s must be a finite number >= 0, got {self.orphan_grace_s!r}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"--max_wait_ms must be >= 0, got {self.max_wait_ms!r}")
        if self.reference_file is not None and not Path(self.reference_file).expanduser().exists():
            raise FileNotFoundError(f"--reference_file: file not found: {self.reference_file}")
        if self.separator == "":
            raise ValueError("--separator must not be empty")
        if self.split_regex is not None:
            try:
                groups = re.compile(self.split_regex, re.DOTALL).groupindex
            except re.error as error:
                raise ValueError(f"--split_regex is not a valid regular expression: {error}") from None
            if "prompt" not in groups or "response" not in groups:
                raise ValueError("--split_regex needs the named groups (?P<prompt>...) and (?P<response>...)")

    def request_token_limit(self, device_type: str) -> int:
        """`--max_request_tokens`, else what about a minute of work is on the device: 4194304 tokens on CUDA (PairRM
        at ~100k tokens/s), 65536 on CPU (~1k-3k tokens/s per core for the real model)."""
        return self.max_request_tokens or (2**22 if device_type == "cuda" else 2**16)

    def body_budget(self) -> int:
        """Bytes of request bodies held at once (being read or computed): `max_concurrency` x `max_body_bytes`."""
        return self.max_concurrency * self.max_body_bytes

    def resolved_token(self) -> str | None:
        """`--token`, else `$PAIRRM_SERVER_TOKEN`, else None (no authentication)."""
        return self.token if self.token is not None else os.environ.get(TOKEN_ENV)
