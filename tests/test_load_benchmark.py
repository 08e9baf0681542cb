"""`benchmarks/server_load.py` runs end to end (tiny: 2 clients x 4 requests against a started server)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "server_load.py"


@pytest.mark.multiprocess
def test_load_benchmark_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("server_load", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "load.json"
    result = module.main(["--clients", "2", "--requests", "4", "--pairrm_device", "cpu", "--json", str(out)])
    assert result["requests"] == 8 and result["errors"] == {}
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert result["pairs"] > 0 and result["batches"] > 0
    assert result["rss_before_mib"] > 0 and result["rss_after_mib"] > 0
    assert json.loads(out.read_text())["requests"] == 8
    assert "| clients | requests |" in capsys.readouterr().out


MEMORY_SCRIPT = Path(__file__).parents[1] / "benchmarks" / "server_memory.py"


@pytest.mark.multiprocess
def test_memory_under_the_amplification_attacks_is_bounded(tmp_path):
    """The issue's two attacks scaled down (8 concurrent bodies), against a server in its own process. Was (same
    scale, measured): +329 MiB for the /rank attack (every pair's token list built before the 413) and +255 MiB
    more for 8 x 4 MiB of `{},{},...` (every empty object built before the 400). Now each is refused before it
    costs more than a few copies of the bodies in flight."""
    spec = importlib.util.spec_from_file_location("server_memory", MEMORY_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--concurrency", "8", "--body_mib", "4", "--json", str(tmp_path / "memory.json")])
    assert result["rank"]["statuses"] == {"413": 8} and result["values"]["statuses"] == {"400": 8}
    bodies_mib = 8 * 4
    assert result["rank"]["peak_mib"] - result["baseline_mib"] < 100
    assert result["values"]["peak_mib"] - result["baseline_mib"] < 4 * bodies_mib + 50
