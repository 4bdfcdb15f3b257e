"""Config loading and validation: unknown keys, wrong types and impossible values name their place."""

from pathlib import Path

import pytest

from common.typed_config import ConfigError
from engine.config import RunConfig, load_config
from tokenizer.schema import load_schema

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_are_the_paper_model():
    cfg = load_config(None)
    assert (cfg.model.layers, cfg.model.hidden, cfg.model.heads) == (4, 128, 4)
    assert cfg.train.lr == 1e-4 and cfg.train.batch_size == 16 and cfg.finetune.batch_size == 128


def test_paper_config_matches_the_paper():
    cfg = load_config(ROOT / "configs" / "paper.toml")
    assert (cfg.model.layers, cfg.model.hidden, cfg.model.heads) == (4, 128, 4)
    segs = cfg.schema.segments
    assert list(segs) == ["long", "short"]
    assert all(s.max_words == 128 for s in segs.values())
    vocab = {(s, a.name): a.max_vocab for s, seg in segs.items() for a in seg.attributes}
    assert vocab[("long", "shop")] == 85124 and vocab[("long", "genre")] == 11438
    assert vocab[("short", "shop")] == 40804 and vocab[("short", "genre")] == 10386
    assert [a.name for a in segs["long"].attributes] == ["action", "channel", "expense", "shop", "genre", "hour"]
    assert [a.name for a in segs["short"].attributes] == ["action", "shop", "genre", "device"]
    # Attribute dims concatenate to H, so no projection is needed at the paper size.
    assert segs["long"].token_dim == segs["short"].token_dim == cfg.model.hidden


def test_demo_config_loads_and_is_small():
    """Every value of configs/demo.toml arrives in the config (not a default), and it is CPU-sized."""
    import tomllib

    raw = tomllib.loads((ROOT / "configs" / "demo.toml").read_text())
    cfg = load_config(ROOT / "configs" / "demo.toml")
    for table, values in raw.items():
        for key, value in values.items():
            got = getattr(getattr(cfg, table), key)
            assert (list(got) if isinstance(got, tuple) else got) == value, f"[{table}].{key}"
    assert cfg.model.hidden != RunConfig().model.hidden  # the file, not the defaults
    assert cfg.model.hidden <= 128 and cfg.model.layers <= 4 and cfg.demo.users <= 20000
    assert cfg.train.device == "cpu" and cfg.train.steps * cfg.train.batch_size <= 100_000


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.n_layer: unknown key"):
        load_config(write(tmp_path, "[model]\nn_layer = 4\n"))


def test_unknown_table_is_named(tmp_path):
    with pytest.raises(ConfigError, match="modle: unknown top-level table"):
        load_config(write(tmp_path, "[modle]\nlayers = 4\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.toml\.train\.lr: expected float, got str"):
        load_config(write(tmp_path, '[train]\nlr = "fast"\n'))
    with pytest.raises(ConfigError, match=r"model\.layers: expected int, got bool"):
        load_config(write(tmp_path, "[model]\nlayers = true\n"))


@pytest.mark.parametrize("text, match", [
    ("[model]\nhidden = 130\nheads = 4\n", r"model\.heads: hidden \(130\) must be divisible"),
    ("[model]\nlayers = 0\n", r"model\.layers: must be >= 1"),
    ("[masking]\nselect_prob = 1.5\n", r"masking\.select_prob: must be in"),
    ("[train]\nbatch_size = 0\n", r"train\.batch_size: must be >= 1"),
    ("[train]\nschedule = \"exp\"\n", r"train\.schedule: expected one of"),
    ("[finetune]\nval_fraction = 1.0\n", r"finetune\.val_fraction"),
])
def test_impossible_values(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_invalid_toml_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.toml: not valid TOML"):
        load_config(write(tmp_path, "[model\n"))


def test_overrides_apply_and_validate():
    cfg = load_config(None, {"model.layers": 2, "train.lr": 3e-4})
    assert cfg.model.layers == 2 and cfg.train.lr == 3e-4
    with pytest.raises(ConfigError, match="layers"):
        load_config(None, {"model.layers": "two"})


SCHEMA = """
[data]
window_start = "2026-01-01T00:00:00"
window_end = "2026-04-01T00:00:00"
timezone = "Asia/Tokyo"

[segments.long]
path = "long"
word_rule = "daily"
position_unit = "day"
attributes = [ { name = "shop", dim = 8 } ]
"""


def test_schema_round_trips_through_toml(tmp_path):
    schema = load_schema(write(tmp_path, SCHEMA))
    again = load_schema(write(tmp_path, schema.to_toml()))
    assert again.to_dict() == schema.to_dict()
    assert schema.segments["long"].attributes[0].column == "shop"


@pytest.mark.parametrize("old, new, match", [
    ('timezone = "Asia/Tokyo"', 'timezone = "Mars/Olympus"', "timezone: unknown time zone"),
    ('window_end = "2026-04-01T00:00:00"', 'window_end = "2025-04-01T00:00:00"', "window_end: must be after"),
    ('window_start = "2026-01-01T00:00:00"', 'window_start = "yesterday"', "window_start: expected an ISO time"),
    ('word_rule = "daily"', 'word_rule = "weekly"', "word_rule: expected one of"),
    ('{ name = "shop", dim = 8 }', '{ name = "shop", dim = 0 }', r"shop\.dim: must be >= 1"),
    ('{ name = "shop", dim = 8 }', '{ name = "shop", dim = 8, buckets = [3, 1] }', "strictly increasing"),
    ('{ name = "shop", dim = 8 }', '{ name = "shop", column = "@minute" }', "unknown derived column"),
])
def test_schema_errors(tmp_path, old, new, match):
    with pytest.raises(ConfigError, match=match):
        load_schema(write(tmp_path, SCHEMA.replace(old, new)))


def test_config_logs_at_start(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="userbert"):
        RunConfig().log()
    assert '"layers": 4' in caplog.text
