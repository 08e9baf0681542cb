"""`pairrm-rlhf serve`: PairRM over HTTP (OpenRLHF's /get_reward and the PairRM API). Needs the `serve` extra."""
