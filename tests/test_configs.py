"""The published recipes in configs/: every YAML parses to a flat mapping of TrainConfig fields
that make a valid TrainConfig, and says where its values and its expected LFW figure come from."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO
from facecli.backbones import BACKBONES
from facecli.engine.config import TrainConfig

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def train_config_fields() -> set[str]:
    """The keys a config file may hold: TrainConfig's fields and the registered losses' options."""
    from facecli.engine.config import all_keys

    return all_keys()


def test_the_five_casia_recipes_are_there():
    names = {p.name for p in CONFIGS}
    for model in ("arcface", "cosface", "sphereface", "curricularface", "facenet", "adaface", "magface", "elasticface"):
        assert f"casia_iresnet50_{model}.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_a_valid_train_config(path: Path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data, "a flat YAML mapping"
    unknown = set(data) - train_config_fields()
    assert not unknown, f"not TrainConfig fields: {sorted(unknown)}"
    assert not any(isinstance(v, dict) for v in data.values()), "flat: no nested sections"
    assert data["backbone"] in BACKBONES
    cfg = TrainConfig(**data)  # the config's own validation (ranges, head hyper-parameters)
    assert cfg.model in path.name
    milestones = data.get("milestones") or []
    assert milestones == sorted(milestones) and all(0 < m < data["epochs"] for m in milestones)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_names_its_source_and_expected_figure(path: Path):
    comments = "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))
    assert "Source:" in comments and "Expected LFW" in comments
    assert "PER PROCESS" in comments  # batch_size x GPUs = the paper's global batch
