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
