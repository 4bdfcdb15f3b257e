"""Telemetry: metrics files that read as one run across a resume, memory numbers, the loss PNG."""


import torch

from engine.train.telemetry import MetricsLogger, Progress, memory_stats, plot_loss_curve, read_metrics


def test_resume_drops_records_from_after_the_checkpoint(tmp_path):
    m = MetricsLogger(tmp_path, tensorboard=False, start_step=0)
    for step in range(10):
        m.log(step, {"loss": 10.0 - step})
    m.close()
    m = MetricsLogger(tmp_path, tensorboard=False, start_step=6)  # the run resumed from a checkpoint at step 6
    m.log(6, {"loss": 99.0})
    m.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6] and rows[-1]["loss"] == 99.0
    m = MetricsLogger(tmp_path, tensorboard=False, start_step=0)  # a fresh run starts the file afresh
    m.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_disabled_logger_writes_nothing(tmp_path):
    m = MetricsLogger(tmp_path / "x", enabled=False)
    m.log(0, {"loss": 1.0})
    m.close()
    assert not (tmp_path / "x").exists()


def test_tensorboard_and_png(tmp_path):
    m = MetricsLogger(tmp_path, start_step=0)
    for step in range(5):
        m.log(step, {"loss": 5.0 - step, "note": "text is kept out of TensorBoard"})
    m.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"], r["note"]) for r in rows] == [(s, 5.0 - s, "text is kept out of TensorBoard")
                                                                  for s in range(5)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == ["loss"]  # numbers only
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, 5.0 - s) for s in range(5)]
    png = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[:2] == (3.5 * 120, 6 * 120)  # the figure size at its dpi
    assert pixels[..., :3].std() > 0.05  # something is drawn, not a blank canvas
    assert plot_loss_curve(tmp_path / "none.jsonl", tmp_path / "none.png") is None


def test_memory_stats_on_cpu():
    stats = memory_stats(torch.device("cpu"))
    assert stats["mem/peak_rss_mb"] > 10 and stats["mem/rss_mb"] > 10
    assert not any(k.startswith("mem/cuda") for k in stats)


def test_progress_shows_loss_lr_and_throughput(capsys):
    p = Progress(10, initial=3)
    p.show({"loss": 1.5, "lr": 1e-4, "users_per_s": 123.0, "tokens_per_s": 4567.0})
    p.update()
    p.close()
    err = capsys.readouterr().err
    assert "4/10" in err and "loss=1.5000" in err and "lr=1.00e-04" in err
    assert "users/s=123" in err and "tok/s=4567" in err
