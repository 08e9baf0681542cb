import json
import logging
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("OMP_NUM_THREADS", "1")  # also for subprocesses (torchrun workers, recipe scripts)
TESTS = Path(__file__).parent
# Subprocesses started by tests (torchrun, recipe scripts) import the test helpers (tiny_policy) too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)

import pytest
import torch

torch.set_num_threads(1)  # the CI machine has 2 cores; tests that need more set it themselves

from pairrm_rlhf import PairRM
from pairrm_rlhf.core.assets import bundled

FIXTURES = TESTS / "fixtures" / "pairrm-reference"
HF_CHECKPOINT = bundled("pairrm")  # the reference fixture's tiny PairRM, hf layout, shipped with the package
BLENDER_CHECKPOINT = FIXTURES / "pairrm-blender"
BASE_MODEL = FIXTURES / "tiny-deberta-v3"


@pytest.fixture(scope="session")
def golden() -> dict:
    return json.loads((FIXTURES / "golden.json").read_text())


@pytest.fixture(scope="session")
def hf_model() -> PairRM:
    return PairRM.from_pretrained(HF_CHECKPOINT, device="cpu")


@pytest.fixture(scope="session")
def blender_model() -> PairRM:
    return PairRM.from_pretrained(BLENDER_CHECKPOINT, base_model=BASE_MODEL, device="cpu")


@pytest.fixture(scope="session", params=["hf", "blender"])
def model(request, hf_model, blender_model) -> PairRM:
    return hf_model if request.param == "hf" else blender_model


@pytest.fixture
def no_models(monkeypatch):
    """Any attempt to load the judge or the policy fails the test (the configuration and the data are checked first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration and the data were checked")

    monkeypatch.setattr(PairRM, "from_pretrained", refuse)
    monkeypatch.setattr("pairrm_rlhf.core.generation.load_policy", refuse)


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """Tests that run the CLI in-process install its log handler and INFO level on the root logger: undo that."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
