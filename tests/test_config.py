from pathlib import Path

import pytest

from saebench.config import HarvestConfig, RunConfig, from_dict, load_config
from saebench.errors import ConfigError


def test_yaml_maps_to_dataclasses(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: x\ndata:\n  context_size: 64\nharvest:\n  hooks: blocks.0.hook_resid_post\n  n_tokens: 1e4\n"
    )
    cfg = load_config(path, ["harvest.batch_size=8", "data.split=test"])
    assert isinstance(cfg, RunConfig)
    assert cfg.data.context_size == 64 and cfg.data.split == "test"
    assert cfg.harvest.hooks == ["blocks.0.hook_resid_post"]
    assert cfg.harvest.n_tokens == 10000 and cfg.harvest.batch_size == 8


@pytest.mark.parametrize(
    "data, message",
    [
        ({"harvset": {}}, "did you mean 'harvest'"),
        ({"harvest": {"n_token": 5}}, "harvest.n_token'; did you mean 'n_tokens'"),
        ({"dtype": "float33"}, "unknown dtype 'float33'; use one of float32, bfloat16, float16"),
        ({"harvest": {"store_dtype": "int8"}}, "harvest.store_dtype: unknown dtype"),
        ({"harvest": {"n_tokens": "many"}}, "harvest.n_tokens: expected an integer"),
        ({"data": {"prepend_bos": "yes"}}, "data.prepend_bos: expected true or false"),
        ({"data": 3}, "data: expected a mapping"),
    ],
)
def test_bad_keys_and_values_name_the_fix(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", "'")):
        from_dict(RunConfig, data)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_defaults_are_valid():
    assert from_dict(HarvestConfig, {}) == HarvestConfig()


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.harvest.hooks and cfg.name
    if path.endswith("tiny-attn.yaml"):  # the induction trace's SAEs, upstream of layer 1, from one pass
        assert cfg.harvest.hooks == ["blocks.0.attn.hook_z", "blocks.0.hook_mlp_out"] and cfg.train.source == "stream"
