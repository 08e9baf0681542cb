"""Temporary: the old CLI's `ServeConfig`/`run_serve(config)` (cli.py's `parse_config` takes one dataclass).
Delete this file once cli.py calls `pairrm_rlhf.serve.make_parser` and `run_serve(serve_args, pairrm_args)`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..args import PairRMArguments
from ..core.assets import DEFAULT_MODEL
from . import command
from .config import ServeArguments


@dataclass
class ServeConfig(ServeArguments):
    """Serve PairRM over HTTP: OpenRLHF's POST /get_reward and the PairRM API, with a fair batching queue."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "PairRM checkpoint (hub id or directory); 'tiny': the bundled one"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ... (default: cuda if available)"})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16 or float16 (default by device)"})


def run_serve(config: ServeConfig) -> None:
    server_fields = {name: getattr(config, name) for name in ServeArguments.__dataclass_fields__}
    command.run_serve(ServeArguments(**server_fields),
                      PairRMArguments(pairrm=config.model, pairrm_device=config.device, pairrm_dtype=config.dtype))
