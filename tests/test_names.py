"""Names that say one thing: code paths named in docs exist, one name for the PairRM an adapter wraps, no
references a reader cannot follow, no module over 500 lines."""

import importlib
import re
from pathlib import Path

import pytest

from pairrm_rlhf import OnlineDPOJudgeReward, PairRM, PairRMJudge, PairwiseReward
from pairrm_rlhf.trl import rewards

from known_preference import LengthBackend

ROOT = Path(__file__).parents[1]
SOURCES = sorted([*(ROOT / "pairrm_rlhf").rglob("*.py"), *(ROOT / "recipes").glob("*.py")])
TEXTS = [*SOURCES, *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]


def resolves(dotted: str) -> bool:
    """`pairrm_rlhf.a.b.c` names a module, or an attribute of the longest importable module prefix."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def test_code_paths_in_backticks_exist(monkeypatch):
    """E.g. `--reward_funcs pairrm_rlhf.rewards.pairrm_reference_reward` (there is no `pairrm_rlhf.rewards`)."""
    monkeypatch.setenv("PAIRRM_MODEL", "tiny")  # the TRL-CLI rewards check their environment when looked up
    broken = []
    for path in TEXTS:
        for quoted in re.findall(r"`([^`\n]+)`", path.read_text()):
            for dotted in re.findall(r"\bpairrm_rlhf(?:\.[A-Za-z_]\w*)+", quoted):
                if not resolves(dotted):
                    broken.append(f"{path.relative_to(ROOT)}: {dotted}")
    assert not broken, "\n".join(broken)


def test_no_issue_numbers_in_code():
    """A comment like "(#15.5)" points at an issue tracker a reader of the code may not have."""
    found = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES for i, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"(?<![\w/])#\d+\.\d+", line)]
    assert not found, found


def test_no_module_over_500_lines():
    long = [f"{p.relative_to(ROOT)}: {n}" for p in (ROOT / "pairrm_rlhf").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500]
    assert not long, long


def test_every_adapter_calls_its_model_pairrm():
    model = PairRM(LengthBackend())
    judge, reward, dpo = PairRMJudge(pairrm=model), PairwiseReward(pairrm=model), OnlineDPOJudgeReward(pairrm=model)
    assert judge.pairrm is model and reward.pairrm is model and dpo.judge.pairrm is model
    with pytest.deprecated_call():
        assert PairRMJudge(model=model).pairrm is model
    with pytest.deprecated_call():
        assert PairwiseReward(model=model).pairrm is model
    with pytest.deprecated_call():
        assert OnlineDPOJudgeReward(judge=model).judge.pairrm is model
    with pytest.raises(TypeError, match="got both pairrm and its deprecated name model"), pytest.deprecated_call():
        PairwiseReward(model, model=model)
    with pytest.raises(TypeError, match="PairwiseReward needs pairrm"):
        PairwiseReward()


def test_reward_constants_name_what_they_hold():
    assert rewards.REWARD_OUTPUTS == ("probability", "logit", "win")
    assert rewards.REWARD_MODES == ("reference", "group")
    assert not hasattr(rewards, "OUTPUTS") and not hasattr(rewards, "MODES")
