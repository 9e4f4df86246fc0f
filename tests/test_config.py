from __future__ import annotations

import pytest

from pipeline.core.config import Config, ConfigError, config_hash, dump_config, load_config


def test_defaults_round_trip(tmp_path):
    cfg = load_config()
    path = tmp_path / "c.toml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)


def test_every_default_is_written_out():
    text = dump_config(Config())
    for key in ("skull_strip", "output_resolutions", "registration_metric", "poll_sleep_duration", "template_dir"):
        assert f"{key} =" in text


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[anat]\nskul_strip = 'template'\n")
    with pytest.raises(ConfigError, match=r"bad\.toml\.anat: unknown key\(s\) \['skul_strip'\]"):
        load_config(path)


def test_wrong_type_and_literal(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[anat]\nskull_strip = 'bet'\n")
    with pytest.raises(ConfigError, match="not one of"):
        load_config(path)
    path.write_text("[execution]\nnprocs = 'two'\n")
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(path)


def test_overrides_win_over_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[anat]\noutput_resolutions = [1, 2]\nskull_strip = 'template'\n")
    cfg = load_config(path, {"anat": {"skull_strip": "deepbet"}})
    assert cfg.anat.output_resolutions == (1, 2)
    assert cfg.anat.skull_strip == "deepbet"


def test_invalid_toml_is_one_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[anat\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_loader_section_is_not_silently_ignored(tmp_path):
    """The loader's settings come from the stage that reads the shards; a [loader] section is an error, not ignored."""
    from pipeline.core.config import ConfigError, load_config

    path = tmp_path / "c.toml"
    path.write_text("[loader]\nshuffle_buffer = 8\n")
    with pytest.raises(ConfigError, match="loader"):
        load_config(path)
