"""The shipped configs (aim_ds/configs, package data): one copy in git that the checkout's ``run/configs`` and
``ds_configs`` point to, found by name (``aim-0.6B``, ``probe_aim-tiny``, ``zero3``) from anywhere, a path winning
when it exists, and an unknown name an error that lists the shipped ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aim_ds.config import ConfigError
from aim_ds.shipped import child_pythonpath, configs_dir, resolve_config, shipped_names, shipped_path

ROOT = Path(__file__).resolve().parents[1]


def test_the_checkout_folders_are_the_package_data() -> None:
    # Symlinks, so that the design card's paths and the wheel's files are one copy.
    assert (ROOT / "ds_configs").is_symlink() and (ROOT / "run/configs").is_symlink()
    assert (ROOT / "ds_configs").resolve() == configs_dir("deepspeed").resolve()
    assert (ROOT / "run/configs").resolve() == configs_dir("run").resolve()
    assert (ROOT / "ds_configs/zero3.json").read_bytes() == shipped_path("zero3", "deepspeed").read_bytes()


def test_names_by_kind() -> None:
    run, probe, ds = shipped_names("run"), shipped_names("probe"), shipped_names("deepspeed")
    assert {"aim-test", "aim-tiny", "aim-0.6B", "aim-7B"} <= set(run) and not any(n.startswith("probe_") for n in run)
    assert {"probe_aim-test", "probe_aim-tiny", "probe_aim-0.6B"} <= set(probe)
    assert probe == [n for n in probe if n.startswith("probe_")]
    assert {"zero3", "zero3_fp32", "zero3_offload", "zero2"} <= set(ds)


@pytest.mark.parametrize(
    ("name", "kind", "file"),
    [("aim-0.6B", "run", "aim-0.6B.yaml"), ("aim-0.6B.yaml", "run", "aim-0.6B.yaml"),
     ("probe_aim-tiny", "probe", "probe_aim-tiny.yaml"), ("zero3", "deepspeed", "zero3.json"),
     ("zero3_fp32.json", "deepspeed", "zero3_fp32.json")],
)  # fmt: skip
def test_a_name_finds_the_shipped_file(name: str, kind: str, file: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # outside the checkout: the name, not a relative path, finds it
    found = Path(resolve_config(name, kind))
    assert found.name == file and found.is_file() and found.parent == configs_dir(kind)


def test_a_path_wins_over_a_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("zero3").write_text("{}")  # a user's own file that happens to share a shipped name
    assert resolve_config("zero3", "deepspeed") == "zero3"
    own = tmp_path / "mine.yaml"
    own.write_text("model: {name: aim-test}\n")
    assert resolve_config(str(own), "run") == str(own)


def test_unknown_names_and_missing_paths_are_errors_listing_the_shipped_names(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError, match=r"--config aim-0\.5B: neither a file nor a shipped pretraining config.*aim-0\.6B"
    ):
        resolve_config("aim-0.5B", "run")
    # a probe name is not a pretraining config, and the other way round
    with pytest.raises(ConfigError, match=r"probe_aim-tiny is a shipped probe config\); shipped names: aim-0\.6B"):
        resolve_config("probe_aim-tiny", "run")
    with pytest.raises(ConfigError, match=r"aim-tiny is a shipped pretraining config\); shipped names: probe_aim"):
        resolve_config("aim-tiny", "probe")
    with pytest.raises(ConfigError, match="zero3_offload"):
        resolve_config("zero4", "deepspeed", "--deepspeed")
    # a mistyped path is never taken for a name (even when its last part is one)
    with pytest.raises(ConfigError, match="no such DeepSpeed config file"):
        resolve_config(f"nowhere{os.sep}zero3.json", "deepspeed", "--deepspeed")


def test_pretrain_driver_takes_names(tmp_path: Path, monkeypatch, capsys) -> None:
    from aim_ds.cli.pretrain import main

    monkeypatch.chdir(tmp_path)
    assert main(["--config", "aim-test", "--deepspeed", "zero3", "--print-out-dir", "out_dir=here"]) == 0
    assert capsys.readouterr().out.strip() == "here"
    assert main(["--config", "aim-tst", "--deepspeed", "zero3", "--print-out-dir"]) == 2


def test_probe_driver_rejects_an_unknown_name(tmp_path: Path, monkeypatch, capsys) -> None:
    from aim_ds.cli.probe import main

    monkeypatch.chdir(tmp_path)
    assert main(["--config", "probe_aim-99B", "--weights", "w"]) == 2
    assert "probe_aim-tiny" in capsys.readouterr().err


def test_live_probe_defaults_to_the_shipped_probe_config(tmp_path: Path, monkeypatch, betons: dict[str, Path]) -> None:
    """Without probe.config, the shipped probe_<model> is used (no checkout needed); a name works too."""
    import dataclasses

    from aim_ds.train.config import LiveProbeSection, ModelSection, PretrainConfig
    from aim_ds.train.live_probe import check_live_probe

    monkeypatch.chdir(tmp_path)
    section = LiveProbeSection(every_steps=10, train_path=str(betons["train"]), val_path=str(betons["val"]))
    cfg = PretrainConfig(model=ModelSection(name="aim-tiny"), probe=section, out_dir=str(tmp_path / "run"))
    settings = check_live_probe(cfg)
    assert Path(settings.config) == shipped_path("probe_aim-tiny", "probe")
    named = check_live_probe(dataclasses.replace(cfg, probe=dataclasses.replace(section, config="probe_aim-test")))
    assert Path(named.config).name == "probe_aim-test.yaml"
    with pytest.raises(ConfigError, match="no probe config ships for model aim-mini"):
        check_live_probe(dataclasses.replace(cfg, model=ModelSection(name="aim-mini")))


def test_child_pythonpath_puts_a_checkout_first_but_never_site_packages() -> None:
    import site

    path = child_pythonpath("/elsewhere")
    parent = str(Path(__import__("aim_ds").__file__).resolve().parents[1])
    if Path(parent) in {Path(p).resolve() for p in site.getsitepackages()}:
        assert path == "/elsewhere"
    else:
        assert path.split(os.pathsep) == [parent, "/elsewhere"]
    assert child_pythonpath(path) == path  # not twice
