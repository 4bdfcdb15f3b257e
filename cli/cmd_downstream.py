"""`finetune`, `evaluate` and `embed`: using a pretrained model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli.common import add_config_args, load_run_config, log


def add_finetune_args(sp: argparse.ArgumentParser) -> None:
    """The finetune flags, shared by `userbert-engine finetune` and cli/finetune.py."""
    add_config_args(sp)
    sp.add_argument("--data", type=Path, required=True, help="tokenized directory")
    sp.add_argument("--labels", type=Path, required=True,
                    help="table of user_id, label (and optionally split = train/val/test)")
    sp.add_argument("--task", choices=["binary", "multiclass", "next"], required=True)
    sp.add_argument("--init", required=True, help="pretraining run dir or exported model dir, or 'none' (scratch)")
    sp.add_argument("--out", type=Path, required=True, help="output directory (FTDIR)")
    sp.add_argument("--split", type=Path, help="table of user_id, split (train/val/test); default: the label "
                                               "table's split column, else a seeded random split")
    sp.add_argument("--freeze-encoder", action="store_true", help="feature-based mode: train only the head")
    sp.add_argument("--strict-users", action="store_true", help="labelled users missing from the data are an error")
    sp.add_argument("--deepspeed_config", "--deepspeed-config", type=Path, metavar="JSON",
                    help="fine-tune through DeepSpeed with this config (e.g. configs/ds/zero1_bf16.json); "
                         "several processes with `deepspeed cli/finetune.py` or `torchrun cli/finetune.py`")


def run_finetune(args: argparse.Namespace) -> dict | None:
    """Fine-tune as ``args`` say; the summary on rank 0 (None on the other ranks).  With ``--deepspeed_config``
    in its own process group (the launcher's, or a one-member group for a plain process: no MPI)."""
    from engine.train.distributed import init_distributed, launched_world_size, shutdown

    cfg = load_run_config(args)
    if args.freeze_encoder:
        cfg.finetune.freeze_encoder = True
    world = launched_world_size()
    if args.deepspeed_config is None:
        if world > 1:
            raise ValueError(f"WORLD_SIZE={world}: multi-process fine-tuning runs through DeepSpeed; "
                             "pass --deepspeed_config")
        return _finetune(args, cfg)
    from engine.downstream.finetune import finetune_deepspeed_config
    from engine.train.backends import import_deepspeed
    from engine.train.deepspeed_config import load_ds_json

    ctx = init_distributed(cfg.train.device)
    try:
        import_deepspeed(ctx.device.type)
        ds = finetune_deepspeed_config(load_ds_json(args.deepspeed_config), cfg.finetune, ctx.world_size,
                                       ctx.device.type, str(args.deepspeed_config))
        cfg.train.device = str(ctx.device)
        out = _finetune(args, cfg, rank=ctx.rank, world_size=ctx.world_size, deepspeed=ds)
        return out if ctx.is_main else None
    finally:
        shutdown(ctx)


def _finetune(args: argparse.Namespace, cfg, rank: int = 0, world_size: int = 1, deepspeed=None) -> dict:
    from engine.config import VocabSpec
    from engine.downstream.finetune import build_encoder, finetune
    from engine.downstream.tasks import load_task, make_split
    from tokenizer.shards import open_tokenized

    ft = cfg.finetune
    data = open_tokenized(args.data)
    td = load_task(args.labels, data, args.task, ft.next_attribute, strict_users=args.strict_users)
    split = make_split(td, ft.val_fraction, ft.test_fraction, ft.seed if ft.split_seed is None else ft.split_seed,
                       args.split, data)
    pretrained = args.init != "none"
    encoder = build_encoder(args.init if pretrained else None, cfg.model, VocabSpec.from_manifest(data.manifest),
                            seed=ft.seed)
    result = finetune(data, td, ft, encoder, split=split, out_dir=args.out, device=cfg.train.device,
                      progress=not args.quiet, init_name="pretrained" if pretrained else "scratch",
                      pretrained=pretrained, rank=rank, world_size=world_size, deepspeed=deepspeed)
    return {"best_epoch": result.best_epoch, "val": result.val, "test": result.test, "popular": result.popular,
            "sizes": result.sizes, "out": str(args.out)}


def cmd_finetune(args: argparse.Namespace) -> int:
    out = run_finetune(args)
    if out is not None:
        print(json.dumps(out, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from engine.config import VocabSpec
    from engine.downstream.evaluate import baseline_outputs, evaluate_outputs, metric_names, plot_curves, write_report
    from engine.downstream.finetune import build_encoder, finetune, load_task_model, predict
    from engine.downstream.tasks import PRIMARY_METRIC, load_task, make_split
    from tokenizer.shards import open_tokenized

    cfg = load_run_config(args)
    ft = cfg.finetune
    data = open_tokenized(args.data)
    spec = VocabSpec.from_manifest(data.manifest)
    models = [_parse_model(m) for m in args.model]
    if not models and not args.scratch:
        raise ValueError("evaluate: give at least one fine-tuned model (--model NAME=FTDIR) or --scratch")
    task = args.task
    metas = {}
    loaded = {}
    for name, ft_dir in models:
        loaded[name], metas[name] = load_task_model(ft_dir, spec)
        if task is None:
            task = metas[name]["task"]
        elif metas[name]["task"] != task:
            raise ValueError(f"{ft_dir}: a {metas[name]['task']} model, but the task is {task}")
    if task is None:
        raise ValueError("evaluate: --task is needed when no fine-tuned model is given")
    next_attribute = next((m.get("next_attribute") for m in metas.values()), None) or ft.next_attribute
    td = load_task(args.labels, data, task, next_attribute)
    # The split: the one the first model was trained with, so every number is on the same test users.
    split_file = args.split or (Path(models[0][1]) / "split.parquet" if models else None)
    for _, ft_dir in models[1:]:
        _check_same_split(split_file, Path(ft_dir) / "split.parquet")
    split = make_split(td, ft.val_fraction, ft.test_fraction, ft.seed if ft.split_seed is None else ft.split_seed,
                       split_file, data)
    if not len(split.test):
        raise ValueError(f"{split_file or args.labels}: the split has no test users to evaluate on")
    test = td.subset(split.test)
    from engine.data.collate import CollateConfig, Collator
    from engine.model.userbert import user_attr_offsets
    from engine.train.distributed import resolve_device

    dev = resolve_device(cfg.train.device)
    collator = Collator(data, user_attr_offsets(spec), CollateConfig(select_prob=0.0))
    k = max(args.k)
    outputs: dict[str, np.ndarray] = {}
    histories = {}
    for name, model in loaded.items():
        outputs[name] = predict(model.to(dev), collator, test.rows, 256, dev, k=k)[0]
        res = Path(dict(models)[name]) / "result.json"
        if res.exists():
            histories[name] = json.loads(res.read_text()).get("history", [])
    if args.scratch:
        model_cfg = cfg.model
        if models and args.config is None and not args.set:
            # The same model without pretraining: the first model's architecture and fine-tuning settings.
            model_cfg, ft = _settings_of(Path(models[0][1]), ft)
        encoder = build_encoder(None, model_cfg, spec, seed=ft.seed)
        result = finetune(data, td, ft, encoder, split=split, device=cfg.train.device, progress=not args.quiet,
                          init_name="scratch", out_dir=args.out / "scratch")
        outputs["scratch"] = predict(result.model, collator, test.rows, 256, dev, k=k)[0]
        histories["scratch"] = result.history
    baselines = [b for b in args.baselines.split(",") if b] if args.baselines else []
    outputs.update(baseline_outputs(data, td, split, tuple(baselines), next_attribute, k=k))
    report = evaluate_outputs(test, outputs, ks=tuple(args.k), n_boot=args.boot, seed=args.seed)
    path = write_report(args.out, {f"{task} ({args.labels})": report}, title="userbert-engine evaluate")
    metric = PRIMARY_METRIC[task]
    if histories:
        flat = {b: report.metrics[b][metric].value for b in baselines if b in report.metrics}
        plot_curves(histories, f"test.{metric}", args.out / f"curve_{metric.replace('@', '_at_')}.png",
                    title=f"{task}: test {metric} per epoch", flat=flat)
    print(report.markdown(metric_names(task, tuple(args.k))))
    log.info("wrote %s", path)
    return 0


def _settings_of(ft_dir: Path, default_ft):
    from common.typed_config import from_dict
    from engine.config import FinetuneConfig
    from engine.downstream.finetune import _model_dir
    from engine.model.export import load_model_description

    model_cfg = load_model_description(_model_dir(ft_dir))[0]
    res = ft_dir / "result.json"
    ft = default_ft
    if res.exists() and "finetune" in (doc := json.loads(res.read_text())):
        ft = from_dict(FinetuneConfig, doc["finetune"], f"{res}: finetune")
    return model_cfg, ft


def _parse_model(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep:
        return Path(text).name, text
    return name, path


def _check_same_split(a: Path | None, b: Path) -> None:
    import pyarrow.parquet as pq

    if a is None or not a.exists() or not b.exists():
        return
    ta, tb = pq.read_table(a), pq.read_table(b)
    if ta.sort_by("user_id") != tb.sort_by("user_id"):
        raise ValueError(f"{a} and {b}: the models were fine-tuned on different splits; their test users differ, "
                         "so their metrics cannot be compared (fine-tune with the same --split or seed)")


def cmd_embed(args: argparse.Namespace) -> int:
    from engine.downstream.user_embeddings import export_embeddings

    export_embeddings(args.data, args.checkpoint, args.out, batch_size=args.batch_size, device=args.device,
                      progress=not args.quiet, pooling=args.pooling)
    return 0


def register(add) -> None:
    sp = add("finetune", cmd_finetune, "fine-tune on a downstream task (first token + task head)")
    add_finetune_args(sp)

    sp = add("evaluate", cmd_evaluate,
             "metrics with bootstrap intervals for fine-tuned models and baselines on the same test users")
    add_config_args(sp)
    sp.add_argument("--data", type=Path, required=True, help="tokenized directory")
    sp.add_argument("--labels", type=Path, required=True, help="table of user_id, label")
    sp.add_argument("--model", action="append", default=[], metavar="[NAME=]FTDIR",
                    help="a fine-tuned model (the --out of finetune); repeatable")
    sp.add_argument("--task", choices=["binary", "multiclass", "next"], help="default: the models' task")
    sp.add_argument("--split", type=Path, help="table of user_id, split; default: the first model's split.parquet")
    sp.add_argument("--baselines", default="popular,history,logreg",
                    help="comma-separated: popular, history (next only), logreg; '' for none")
    sp.add_argument("--scratch", action="store_true",
                    help="also fine-tune the same model without pretraining (config: --config/--set) on the split")
    sp.add_argument("--k", type=int, nargs="+", default=[10, 20], help="cut-offs of the ranking metrics")
    sp.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    sp.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    sp.add_argument("--out", type=Path, required=True, help="output directory (results.md, results.json, curves)")

    sp = add("embed", cmd_embed, "write user embeddings (user_id, embedding) to Parquet")
    sp.add_argument("--data", type=Path, required=True, help="tokenized directory")
    sp.add_argument("--checkpoint", type=Path, required=True,
                    help="pretraining run dir, exported model dir, or fine-tuned model dir")
    sp.add_argument("--out", type=Path, required=True, help="output Parquet file")
    sp.add_argument("--batch-size", type=int, default=512)
    sp.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    sp.add_argument("--pooling", choices=["cls", "mean", "attention"],
                    help="cls: the first token's final state (the paper); mean: the mean over the user's tokens; "
                         "attention: a fine-tuned model's learned attention pooling (fine-tuned dirs only). "
                         "Default: a fine-tuned model's own pooling, else mean (pretraining trains the word states, "
                         "not the first token's)")
