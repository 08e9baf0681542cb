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

from .app import BackgroundServer, build_app
from .command import make_parser, run_serve
from .config import ServeArguments

__all__ = ["BackgroundServer", "ServeArguments", "build_app", "make_parser", "run_serve"]
