"""`pairrm-rlhf serve`: PairRM over HTTP (OpenRLHF's /get_reward and the PairRM API). Needs the `serve` extra.

Rooms: `config` (ServeArguments), `batcher` (the fair engine queue, a `PairBackend`), `openrlhf` (query parsing,
references, the /get_reward answer), `limits` (sizes, fields, work), `app` (routes, auth, timeouts, cancellation),
`http` (uvicorn's protocol with deadlines and connection caps, Host checks), `command` (`make_parser`, `run_serve`).
The wire format shared with the client is `backends.wire`.
"""

try:
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"pairrm_rlhf.serve needs the serve extra ({error.name} is missing): pip install 'pairrm-rlhf[serve]'"
    ) from error

import importlib
from typing import Any

from .config import ServeArguments

# The rest loads on first use: `pairrm-rlhf serve --help` and a bad flag need no torch, and
# `python -m pairrm_rlhf.serve.command` does not find its own module already imported (runpy's RuntimeWarning).
_LAZY = {"BackgroundServer": "app", "build_app": "app", "make_parser": "command", "run_serve": "command"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BackgroundServer", "ServeArguments", "build_app", "make_parser", "run_serve"]
