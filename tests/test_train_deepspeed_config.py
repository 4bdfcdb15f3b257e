"""DeepSpeed JSON configs: "auto" filled from the run config, mismatches and impossible setups refused
before any work.  Pure data checks: DeepSpeed itself is not imported here."""

import json
from pathlib import Path

import pytest

from common.typed_config import ConfigError
from engine.config import TrainConfig, load_config
from engine.train.deepspeed_config import load_ds_json, resolve_ds_config

ROOT = Path(__file__).resolve().parents[1]
DS = ROOT / "configs" / "ds"
SHIPPED = sorted(DS.glob("*.json"))


def test_shipped_configs_cover_the_issue():
    names = {p.stem for p in SHIPPED}
    assert {"zero0_bf16", "zero1_bf16", "zero2_bf16", "zero2_fp16"} <= names
    stages, precisions, schedules = set(), set(), set()
    for p in SHIPPED:
        raw = load_ds_json(p)
        stages.add(raw["zero_optimization"]["stage"])
        precisions.add("fp16" if raw.get("fp16", {}).get("enabled") else "bf16")
        schedules.add(raw.get("scheduler", {}).get("type"))
        assert raw["optimizer"]["type"] in ("Adam", "AdamW") and raw["optimizer"]["params"]["lr"] == "auto"
        assert raw["gradient_clipping"] == "auto"
    assert stages == {0, 1, 2} and precisions == {"bf16", "fp16"}
    assert {"WarmupDecayLR", "WarmupCosineLR"} <= schedules
    fp16 = load_ds_json(DS / "zero2_fp16.json")["fp16"]
    assert fp16["loss_scale"] == 0  # 0 = dynamic loss scaling


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_resolves(path):
    raw = load_ds_json(path)
    device = "cuda" if raw.get("fp16", {}).get("enabled") else "cpu"
    r = resolve_ds_config(raw, load_config(ROOT / "configs" / "paper.toml").train, 2, device, str(path))
    c = r.config
    assert c["train_batch_size"] == c["train_micro_batch_size_per_gpu"] * c["gradient_accumulation_steps"] * 2 == 16
    assert r.train.lr == 1e-4  # Adam at the paper's lr, from the run config
    assert "optimizer" not in c and "scheduler" not in c and not any(k.startswith("_") for k in c)
    json.dumps(c)  # plain data


def test_auto_takes_the_run_config_and_derives_the_batch():
    tc = TrainConfig(batch_size=64, lr=3e-4, grad_clip=0.5, warmup_steps=10, steps=100, micro_batch_size=8)
    r = resolve_ds_config(load_ds_json(DS / "zero2_bf16_warmup_cosine.json"), tc, 4, "cpu")
    assert (r.layout.micro_batch, r.layout.accumulation) == (8, 2)
    assert r.config["gradient_accumulation_steps"] == 2 and r.config["gradient_clipping"] == 0.5
    assert r.train.schedule == "cosine" and r.precision == "bf16" and r.zero_stage == 2
    assert tc.schedule == "constant"  # the caller's config is not mutated
    lin = resolve_ds_config(load_ds_json(DS / "zero1_bf16_warmup_linear.json"), TrainConfig(batch_size=16), 2, "cpu")
    assert (lin.layout.micro_batch, lin.layout.accumulation, lin.train.schedule) == (4, 2, "linear")


def test_explicit_values_must_agree():
    raw = {"train_batch_size": 32, "gradient_clipping": 2.0, "bf16": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    with pytest.raises(ConfigError) as e:
        resolve_ds_config(raw, TrainConfig(), 1, "cpu", "x.json")
    msg = str(e.value)
    assert "x.json" in msg and "train_batch_size = 32 but train.batch_size = 16" in msg
    assert "gradient_clipping = 2.0 but train.grad_clip = 1.0" in msg and "optimizer.params.lr = 0.001" in msg
    assert '"auto"' in msg
    ok = resolve_ds_config({**raw, "train_batch_size": 16, "gradient_clipping": 1.0,
                            "optimizer": {"type": "Adam", "params": {"lr": 1e-4}}}, TrainConfig(), 1, "cpu")
    assert ok.layout.global_batch == 16


@pytest.mark.parametrize("raw, device, match", [
    ({"fp16": {"enabled": True}}, "cpu", r"fp16 needs a GPU"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "cuda", r"both enabled"),
    ({"zero_optimization": {"stage": 3}}, "cpu", r"stage = 3"),
    ({"optimizer": {"type": "Lamb"}}, "cpu", r"optimizer.type = 'Lamb'"),
    ({"scheduler": {"type": "OneCycle"}}, "cpu", r"scheduler.type = 'OneCycle'"),
    ({"scheduler": {"type": "WarmupLR", "params": {}}}, "cpu", r"warmup_type.*linear"),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_type": "linear", "cos_min_ratio": 0.1}}}, "cpu",
     r"cos_min_ratio = 0.1"),
    ({"train_micro_batch_size_per_gpu": 3}, "cpu", r"not a multiple of micro_batch_size 3"),
])
def test_impossible_setups_fail_clearly(raw, device, match):
    with pytest.raises(ValueError, match=match):
        resolve_ds_config(raw, TrainConfig(batch_size=16), 2, device)


def test_world_size_must_divide_the_batch():
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        resolve_ds_config(load_ds_json(DS / "zero2_bf16.json"), TrainConfig(batch_size=16), 3, "cpu")


def test_bad_json_names_the_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{ nope")
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON"):
        load_ds_json(p)
    with pytest.raises(ConfigError, match="not found"):
        load_ds_json(tmp_path / "missing.json")
