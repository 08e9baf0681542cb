"""`pairrm-rlhf serve` in TRL's script style: `make_parser()` (TrlParser over `ServeArguments` and
`PairRMArguments`, so `--config serve.yaml` with an `env:` block works) and `run_serve(serve_args, pairrm_args)`.

    python -m pairrm_rlhf.serve.command --pairrm tiny --port 8000 --reference "I don't know."
"""

from __future__ import annotations

import argparse
import logging

from ..args import PairRMArguments, resolve_config
from .app import announce, bind, build_app, uvicorn_server
from .config import ServeArguments

logger = logging.getLogger(__name__)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    """The `serve` parser: a `TrlParser` of (ServeArguments, PairRMArguments), or a subcommand of `subparsers`."""
    from trl import TrlParser

    dataclass_types = (ServeArguments, PairRMArguments)
    if subparsers is not None:
        return subparsers.add_parser("serve", help="Serve PairRM over HTTP (OpenRLHF /get_reward, the PairRM API)",
                                     dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=prog)


def run_serve(serve_args: ServeArguments, pairrm_args: PairRMArguments) -> None:
    """Load the judge and serve it until SIGINT/SIGTERM; in-flight requests are answered before exiting."""
    model = pairrm_args.load()
    app = build_app(serve_args, model, pairrm_args.pairrm_batch_size)
    sock = bind(serve_args.host, serve_args.port)
    announce(serve_args, app.state.service, pairrm_args.pairrm, sock.getsockname()[1])
    uvicorn_server(serve_args, app).run(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import sys

    parser = make_parser(prog="pairrm-rlhf serve")
    serve_args, pairrm_args = parser.parse_args_and_config(resolve_config(sys.argv[1:] if argv is None else argv))
    run_serve(serve_args, pairrm_args)


if __name__ == "__main__":
    main()
