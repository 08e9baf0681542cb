import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

import pytest

from pairrm_rlhf import PairRM
from pairrm_rlhf.cli import bundled_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "pairrm-reference"
HF_CHECKPOINT = bundled_checkpoint()  # the reference fixture's tiny PairRM, hf layout, shipped with the package
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
