"""CacheConfig and the model identity every page key carries."""
import json

import numpy as np
import pytest

from kvdirect import KVLayout
from kvdirect.cache import KVDirectCache
from kvdirect.config import CacheConfig, model_identity
from kvdirect.errors import ConfigError


def _layout():
    k = [np.zeros((16, 1, 4), np.float32)]
    return KVLayout.from_mha(k, [np.zeros_like(k[0])], page_size=4)


def test_cache_refuses_to_start_without_a_model_identity():
    # two engines with different weights and the same KV shape would read each other's pages
    with pytest.raises(ConfigError, match=r"CacheConfig\(model=\.\.\.\)"):
        KVDirectCache(_layout(), None, config=CacheConfig(store=None))


@pytest.mark.parametrize("bad", ["", "   ", 7])
def test_empty_or_non_string_model_is_refused(bad):
    with pytest.raises(ConfigError, match="model"):
        CacheConfig(model=bad)


def test_model_identity_tells_apart_revision_quantization_and_config(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 64}))
    base = model_identity("org/model", config_file=cfg)
    assert base.startswith("org/model|config=")
    others = {model_identity("org/model", revision="r2", config_file=cfg),
              model_identity("org/model", quantization="fp8", config_file=cfg),
              model_identity("org/other", config_file=cfg)}
    cfg.write_text(json.dumps({"hidden_size": 128}))
    others.add(model_identity("org/model", config_file=cfg))
    assert base not in others and len(others) == 4
    # same inputs, same identity (another process, another host)
    assert model_identity("org/model", revision="r2") == model_identity("org/model", revision="r2")
    assert model_identity("org/model", config_file=tmp_path / "missing.json") == "org/model"
    with pytest.raises(ConfigError):
        model_identity("")


def test_model_identity_carries_config_overrides():
    plain = model_identity("org/model")
    assert model_identity("org/model", overrides={}) == plain == model_identity("org/model", overrides="{}")
    rope = model_identity("org/model", overrides={"rope_theta": 2e4, "max_position_embeddings": 4096})
    # a dict and its JSON text, keys in any order, are one identity
    assert rope == model_identity("org/model", overrides='{"max_position_embeddings": 4096, "rope_theta": 20000.0}')
    assert rope != plain and rope != model_identity("org/model", overrides={"rope_theta": 1e4})
    for bad, words in (("{not json", "not valid JSON"), ("[1, 2]", "must be a dict"),
                       (lambda c: c, "must be a dict"), ({"x": object()}, "cannot enter the model identity")):
        with pytest.raises(ConfigError, match=words):
            model_identity("org/model", overrides=bad)
