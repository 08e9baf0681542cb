"""Every fenced python and bash snippet of README.md runs as written on a CPU-only machine with no network.

A snippet that cannot run here (it needs the hub, PyPI, or is the test suite itself) is marked by an HTML comment
`<!-- no-test: why -->` on the line before its fence; those are few and each says why.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
FENCE = re.compile(r"(?:<!-- no-test: (?P<why>[^>]*?) -->\n)?```(?P<lang>python|bash)\n(?P<code>.*?)```", re.DOTALL)


def snippets() -> list[tuple[str, str, str | None]]:
    return [(m["lang"], m["code"], m["why"]) for m in FENCE.finditer(README.read_text())]


SNIPPETS = snippets()
RUNNABLE = [(lang, code) for lang, code, why in SNIPPETS if why is None]


def test_readme_is_short_and_its_untested_snippets_are_few_and_explained():
    assert len(README.read_text().splitlines()) <= 250
    skipped = [why for _, _, why in SNIPPETS if why is not None]
    assert len(skipped) <= 3 and all(len(why) > 10 for why in skipped)
    assert len(RUNNABLE) >= 3


@pytest.mark.parametrize("lang, code", [
    # subprocesses that load models: not in test-fast
    pytest.param(lang, code, marks=[pytest.mark.slow], id=f"{lang}-{i}")
    for i, (lang, code) in enumerate(RUNNABLE)
])
def test_readme_snippet_runs(tmp_path, lang, code):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",  # as on a CPU-only machine
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    (tmp_path / "recipes").symlink_to(README.parent / "recipes")  # snippets run as from a checkout, in a scratch dir
    command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"README {lang} snippet failed:\n{code}\n--- stderr ---\n{result.stderr[-3000:]}"
