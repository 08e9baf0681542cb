"""How responses are sampled (`SamplingArguments`), without torch: the `label` command's flags and the recipes'
configs parse it before anything heavy loads. `core.generation` turns it into a `GenerationConfig` (transformers) and
`SamplingParams` (vLLM)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Who samples: transformers' `generate` or vLLM (`core.generation.vllm_sampling_params`: the same sampling).
BACKENDS = ("transformers", "vllm")


def check_backend(value: str, flag: str = "--sampling_backend") -> None:
    """A one-line ValueError naming `flag` when `value` is not one of `BACKENDS`."""
    if value not in BACKENDS:
        raise ValueError(f"{flag} must be one of {', '.join(BACKENDS)}, got {value!r}")

# Sampling fields, their neutral values (what "not set" means unless the user opts in to the checkpoint's).
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
# Other logits processors a checkpoint may switch on; always set to their neutral values.
OFF = {"typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "no_repeat_ngram_size": 0,
       "encoder_repetition_penalty": 1.0, "num_beams": 1, "min_new_tokens": 0}
# (min_length is left alone: with min_new_tokens also set, transformers warns on every call; min_new_tokens wins)


@dataclass
class SamplingArguments:
    """How responses are sampled. A field left at None is neutral (no filtering, no penalty, temperature 1), or the
    checkpoint's `generation_config` value when `use_checkpoint_sampling` is true."""

    max_new_tokens: int = field(default=256, metadata={"help": "most tokens per response"})
    do_sample: bool = field(default=True, metadata={"help": "sample (true) or decode greedily (false)"})
    temperature: float | None = field(default=None, metadata={"help": "sampling temperature (default 1.0)"})
    top_p: float | None = field(default=None, metadata={"help": "nucleus sampling p (default 1.0: off)"})
    top_k: int | None = field(default=None, metadata={"help": "top-k sampling (default 0: off)"})
    min_p: float | None = field(default=None, metadata={"help": "min-p sampling (default 0.0: off)"})
    repetition_penalty: float | None = field(default=None, metadata={"help": "repetition penalty (default 1.0: off)"})
    stop: list[str] | None = field(default=None, metadata={"help": "extra stop strings (EOS always stops)"})
    use_checkpoint_sampling: bool = field(
        default=False, metadata={"help": "take unset sampling fields from the checkpoint's generation_config"})

    def __post_init__(self) -> None:
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        checks = {"temperature": lambda v: v > 0, "top_p": lambda v: 0 < v <= 1, "top_k": lambda v: v >= 0,
                  "min_p": lambda v: 0 <= v <= 1, "repetition_penalty": lambda v: v > 0}
        for name, ok in checks.items():
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise ValueError(f"{name}={value!r} is out of range")

    def resolved(self, checkpoint: Any = None) -> dict[str, Any]:
        """The sampling fields with every None replaced (by the checkpoint's value when opted in, else neutral)."""
        out = {}
        for name, neutral in NEUTRAL.items():
            value = getattr(self, name)
            if value is None and self.use_checkpoint_sampling and checkpoint is not None:
                value = getattr(checkpoint, name, None)
            out[name] = neutral if value is None else value
        return out
