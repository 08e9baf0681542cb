"""Pair backends other than the plain encoder engine: Better-PairRM's template, RLHFlow's causal-LM judge, and
the HTTP client of a `pairrm-rlhf serve` server. Each implements `core.backend.PairBackend`; `registry` is the one
table of judges (name -> loader -> template -> limits)."""
