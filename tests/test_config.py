"""The typed YAML config loader with dotted overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from aim_ds.config import ConfigError, load_config, save_config, to_dict


@dataclass
class Train:
    steps: int = 10
    lr: float = 1e-3
    grad_checkpointing: bool = False
    scale: tuple[float, float] = (0.4, 1.0)


@dataclass
class Data:
    sources: list[dict] = field(default_factory=list)
    val_path: str | None = None


@dataclass
class Model:
    name: str = "aim-test"
    overrides: dict = field(default_factory=dict)


@dataclass
class Run:
    out_dir: str = "runs/x"
    model: Model = field(default_factory=Model)
    train: Train = field(default_factory=Train)
    data: Data = field(default_factory=Data)


def test_yaml_then_overrides_with_types(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"steps": 5}, "data": {"sources": [{"path": "a.beton", "prob": 1.0}]}}))
    cfg = load_config(
        Run,
        path,
        [
            "train.lr=3e-4",
            "train.grad_checkpointing=true",
            "out_dir=runs/try",
            "train.scale=[0.08,1]",
            "data.val_path=none",
        ],
    )
    assert cfg.train.steps == 5 and cfg.train.lr == 3e-4 and cfg.train.grad_checkpointing is True
    assert cfg.train.scale == (0.08, 1.0) and cfg.out_dir == "runs/try" and cfg.data.val_path is None
    assert cfg.data.sources == [{"path": "a.beton", "prob": 1.0}]


def test_one_key_of_a_mapping_from_the_command_line(tmp_path: Path) -> None:
    """``model.overrides.depth=16`` sets one key of a mapping field and keeps the file's other keys."""
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  overrides: {head_depth: 2, width: 64}\n")
    cfg = load_config(Run, path, ["model.overrides.depth=16", "model.overrides.width=128", "model.overrides.x=[1,2]"])
    assert cfg.model.overrides == {"head_depth": 2, "width": 128, "depth": 16, "x": [1, 2]}
    assert load_config(Run, None, ["model.overrides.depth=3"]).model.overrides == {"depth": 3}
    with pytest.raises(ConfigError, match="'model.overrides' is not a section"):
        load_config(Run, None, ["model.overrides.depth.deeper=3"])


def test_unknown_keys_name_the_key_and_nearest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.setps.*train\.steps"):
        load_config(Run, None, ["train.setps=4"])
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError, match=r"train\.lrr.*train\.lr"):
        load_config(Run, path)


def test_bad_values_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.steps.*integer"):
        load_config(Run, None, ["train.steps=ten"])
    with pytest.raises(ConfigError, match="true or false"):
        load_config(Run, None, ["train.grad_checkpointing=maybe"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Run, None, ["train.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="section"):
        load_config(Run, None, ["train=3"])


def test_save_round_trip(tmp_path: Path) -> None:
    cfg = load_config(Run, None, ["train.steps=7"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Run, tmp_path / "run" / "config.yaml") == cfg
    assert to_dict(cfg)["train"]["scale"] == [0.4, 1.0]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]  # no temporary left behind


@dataclass
class Source:
    path: str = ""
    prob: float = 1.0


@dataclass
class WithSources:
    sources: list[Source] = field(default_factory=list)


def test_list_of_sections_from_the_command_line() -> None:
    cfg = load_config(WithSources, None, ["sources=[{path: a.beton, prob: 0.8}, {path: b.beton, prob: 0.2}]"])
    assert cfg.sources == [Source("a.beton", 0.8), Source("b.beton", 0.2)]
    with pytest.raises(ConfigError, match="probb"):
        load_config(WithSources, None, ["sources=[{path: a.beton, probb: 1}]"])
