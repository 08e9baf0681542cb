"""`pairrm-rlhf serve` in TRL's script style: `make_parser()` (TrlParser over `ServeArguments` and
`PairRMArguments`, so `--config serve.yaml` with an `env:` block works) and `run_serve(serve_args, pairrm_args)`.

    python -m pairrm_rlhf.serve.command --pairrm tiny --port 8000 --reference "I don't know."

The port is bound before the judge loads: a bad or busy `--port` is one line and exit code 2 in a second, not a
traceback after the model loaded (`core.entry.run_command`).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from ..args import PairRMArguments
from ..core.entry import parse, run_command
from .config import ServeArguments

logger = logging.getLogger(__name__)


def make_parser(prog: str | None = None) -> Any:
    """The `serve` parser: a `TrlParser` of (ServeArguments, PairRMArguments)."""
    from trl import TrlParser

    return TrlParser((ServeArguments, PairRMArguments), prog=prog)


def bind_port(host: str, port: int) -> socket.socket:
    """The server's socket, bound now; a port out of range or taken is a one-line error naming `--port`."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: must be 0..65535 (0: any free port)")
    from .app import bind
    try:
        return bind(host, port)
    except OSError as error:
        raise OSError(f"--port {port}: cannot listen on {host}:{port}: {error.strerror or error} "
                      "(is another server on it? pick another port, or 0 for any free one)") from error


def run_serve(serve_args: ServeArguments, pairrm_args: PairRMArguments) -> None:
    """Bind the port, load the judge and serve it until SIGINT/SIGTERM; in-flight requests are answered first."""
    sock = bind_port(serve_args.host, serve_args.port)
    try:
        from .app import announce, build_app, uvicorn_server

        pairrm_args.check_environment()  # the device and, offline, that a hub id is cached
        model = pairrm_args.load()
        app = build_app(serve_args, model, pairrm_args.pairrm_batch_size)
        announce(serve_args, app.state.service, pairrm_args.pairrm, sock.getsockname()[1])
        uvicorn_server(serve_args, app).run(sockets=[sock])
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> None:
    """`python -m pairrm_rlhf.serve.command [--flags]`: the same as `pairrm-rlhf serve`."""
    prog = "pairrm-rlhf serve"
    run_command(prog, lambda: run_serve(*parse(make_parser(), argv, prog)))


if __name__ == "__main__":
    main()
