from pathlib import Path

import pytest

from turntune.config import Config, load_config
from turntune.errors import ConfigError

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert load_config(None, []).train.lr > 0


def test_overrides_are_typed():
    cfg = load_config(None, ["--train.lr=1e-4", "data.eval=null", "lora.target_modules=q_proj,v_proj",
                             "data.packing=false", "train.max_steps=7"])
    assert (cfg.train.lr, cfg.data.eval, cfg.lora.target_modules, cfg.data.packing, cfg.train.max_steps) == \
        (1e-4, None, ("q_proj", "v_proj"), False, 7)


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown setting 'train.lrr'; valid settings in 'train': autocast"),
    ("trian.lr=1", "unknown setting 'trian'"),
    ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ("train.max_steps=1.5", "train.max_steps: expected an integer, got 1.5"),
    ("data.strategy=each", "data.strategy: unknown value 'each'; valid values: all, expand, last, full"),
    ("data.packing=maybe", "data.packing: expected true or false"),
    ("lr=1", "write it as section.key=value"),
])
def test_bad_settings_name_the_setting(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="c.yaml: not valid YAML"):
        load_config(p)
    p.write_text("train:\n  lr: 1\nextra: {}\n")
    with pytest.raises(ConfigError, match="unknown setting 'extra'"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "lora.target_modules=q_proj"])
    p = tmp_path / "saved.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p) == cfg
