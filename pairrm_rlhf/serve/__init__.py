"""`pairrm-rlhf serve`: PairRM over HTTP (OpenRLHF's /get_reward and the PairRM API). Needs the `serve` extra.

Rooms: `config` (ServeArguments), `batcher` (the fair engine queue, a `PairBackend`), `openrlhf` (query parsing,
references, the /get_reward answer), `limits` (sizes, fields, work), `app` (routes, auth, timeouts, uvicorn),
`command` (`make_parser`, `run_serve`).
"""

try:
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"pairrm_rlhf.serve needs the serve extra ({error.name} is missing): pip install 'pairrm-rlhf[serve]'"
    ) from error

from typing import Any

from .app import BackgroundServer, build_app
from .config import ServeArguments


def __getattr__(name: str) -> Any:
    """`make_parser` and `run_serve` come from `command` on first use, so `python -m pairrm_rlhf.serve.command` does
    not find its own module already imported (runpy's RuntimeWarning)."""
    if name in ("make_parser", "run_serve"):
        from . import command

        return getattr(command, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["BackgroundServer", "ServeArguments", "build_app", "make_parser", "run_serve"]
