"""Typed run configs: model, masking, training and fine-tuning, loaded from TOML.

A run config file may also hold the schema tables ([data], [segments.*], [[user_attributes]]),
as configs/paper.toml does; those are read by :func:`tokenizer.schema.load_schema`.
Every table here is optional and defaults to the paper's settings.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.typed_config import ConfigError, from_dict, read_toml, to_dict
from tokenizer.schema import SchemaConfig, schema_from_dict

log = logging.getLogger("userbert")

Impl = Literal["auto", "triton", "torch"]


@dataclass
class ModelConfig:
    hidden: int = 128  # H
    layers: int = 4  # L
    heads: int = 4  # A
    ffn_mult: int = 4  # feed-forward width = ffn_mult * H, as in BERT
    dropout: float = 0.1
    attn_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02
    kernel_impl: Impl = "auto"  # auto: Triton on CUDA, torch elsewhere
    # A user-level pretraining objective beside the paper's masked words (an option; 0 = the paper):
    # from the mean of the user's final states (the embedding `embed` exports), predict the whole
    # distribution of each behaviour attribute's values in the user's history, masked words included.
    # The masked-word task never asks the pooled state to summarise the user; this does.  A model
    # setting because it adds heads (H x V per attribute) that the exported model carries.
    user_bag_weight: float = 0.0
    # A contrastive user-level objective (an option; 0 = the paper), CL4SRec-style: a second pass over a
    # random crop of the user's tokens (each kept with probability contrastive_keep, CLS always), and an
    # InfoNCE loss that pulls the two mean-pooled states of a user together and pushes other users' away.
    # It asks the exported embedding to identify the user from part of the history; no parameters.
    contrastive_weight: float = 0.0
    contrastive_keep: float = 0.6
    contrastive_temperature: float = 0.1

    def __post_init__(self) -> None:
        if self.user_bag_weight < 0:
            raise ConfigError(f"user_bag_weight: must be >= 0, got {self.user_bag_weight}")
        if self.contrastive_weight < 0 or not 0.0 < self.contrastive_keep < 1.0 or self.contrastive_temperature <= 0:
            raise ConfigError("contrastive_weight must be >= 0, contrastive_keep in (0, 1) and "
                              f"contrastive_temperature > 0, got {self.contrastive_weight}, {self.contrastive_keep}, "
                              f"{self.contrastive_temperature}")
        for key in ("hidden", "layers", "heads", "ffn_mult"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.hidden % self.heads:
            raise ConfigError(f"heads: hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        for key in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{key}: must be in [0, 1), got {getattr(self, key)}")


@dataclass
class MaskingConfig:
    select_prob: float = 0.15  # share of behaviour words selected per user
    zero_prob: float = 0.8  # share of selected words whose token vector is zeroed
    normalize_labels: bool = True  # target y/|y| (a distribution); False: the unnormalised multi-hot sum
    # "mean": summed over heads, averaged over masked words (Adam is invariant to this constant up
    # to eps, and it keeps clipping thresholds batch-size independent); "sum": the paper's literal sum.
    loss_reduction: Literal["mean", "sum"] = "mean"

    def __post_init__(self) -> None:
        if not 0.0 < self.select_prob <= 1.0:
            raise ConfigError(f"select_prob: must be in (0, 1], got {self.select_prob}")
        if not 0.0 <= self.zero_prob <= 1.0:
            raise ConfigError(f"zero_prob: must be in [0, 1], got {self.zero_prob}")


@dataclass
class TrainConfig:
    """Pretraining: optimisation, batching, checkpoints, loading.  Read by engine/train/pretrain.py.

    A DeepSpeed JSON (``--deepspeed_config``) may hold "auto" for the batch, clipping, optimizer and
    scheduler values, which are then taken from here; explicit values there must agree with these
    (docs/TRAINING.md).
    """

    batch_size: int = 16  # global batch, in users (paper: 16) = micro_batch_size x accumulation x world size
    micro_batch_size: int = 0  # users per rank per forward pass; 0: batch_size / world size (no accumulation)
    steps: int = 400_000  # optimizer steps (paper: 400K batches)
    lr: float = 1e-4  # Adam, as in the paper
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # resume checkpoint every N steps (0: none on the way)
    checkpoint_at_end: bool = True  # and one after the last step
    keep_checkpoints: int = 3  # the last K resume checkpoints are kept
    # Also export the model at these steps, to RUNDIR/model_step<N> (curves of embedding quality
    # against pretraining length from one run; the last step's model is RUNDIR/model as always).
    export_steps: tuple[int, ...] = ()
    max_bad_steps: int = 5  # abort after this many consecutive non-finite losses / unrecoverable skipped updates
    max_seconds: float = 0.0  # stop early after this wall time (0: no limit)
    device: str = "auto"  # auto: cuda if available, else cpu
    precision: Literal["fp32", "bf16"] = "fp32"  # plain-torch backend (bf16 autocast); DeepSpeed takes its JSON's
    group_by_length: bool = True  # batch users of similar length (less padding); see engine/data/loader.py
    num_threads: int = 0  # torch CPU threads (0: torch's default)
    loader_workers: int = -1  # collate threads per rank; -1: auto (up to 4 on GPU, 0 on CPU)
    prefetch_factor: int = 4  # batches collated ahead per loader thread
    pin_memory: bool = True  # pinned host batches (GPU only) for asynchronous copies

    def __post_init__(self) -> None:
        for key in ("batch_size", "steps", "log_every", "keep_checkpoints", "max_bad_steps", "prefetch_factor"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0 or self.eps <= 0:
            raise ConfigError(f"lr and eps: must be > 0, got lr={self.lr}, eps={self.eps}")
        if (self.warmup_steps < 0 or self.checkpoint_every < 0 or self.grad_clip < 0 or self.micro_batch_size < 0
                or self.max_seconds < 0 or self.weight_decay < 0):
            raise ConfigError("warmup_steps, checkpoint_every, grad_clip, micro_batch_size, max_seconds and "
                              "weight_decay must be >= 0")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ConfigError(f"micro_batch_size: batch_size ({self.batch_size}) must be a multiple of it "
                              f"({self.micro_batch_size})")
        if self.loader_workers < -1:
            raise ConfigError(f"loader_workers: must be >= 0, or -1 for auto; got {self.loader_workers}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas: expected two values in [0, 1), got {list(self.betas)}")


@dataclass
class FinetuneConfig:
    batch_size: int = 128  # paper: 128
    epochs: int = 10
    lr: float = 1e-4  # the encoder's (top layer's) learning rate
    weight_decay: float = 0.01
    head_lr_mult: float = 10.0  # the fresh task head learns faster than the pretrained encoder
    # The split by user: test_fraction is held out and only evaluated (the "20" of 80/20);
    # val_fraction of all labelled users, taken from the other 80%, chooses the epoch.
    test_fraction: float = 0.2
    val_fraction: float = 0.1  # 0: no early stopping (the last epoch is kept)
    split_seed: int | None = None  # None: `seed`; fix it to vary the training seed on one split
    patience: int = 3  # early stopping: epochs without a better validation score
    early_stop_on: Literal["metric", "loss"] = "metric"  # the primary metric (AUC, mAP@10) or the loss
    freeze_encoder: bool = False  # feature-based mode: only the head trains
    probe_epochs: int = 0  # linear probe first: this many head-only epochs, then end to end (LP-FT)
    layer_lr_decay: float = 1.0  # encoder layer i of L learns at lr * decay**(L-1-i); embeddings one step lower
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    next_attribute: str = "long.genre"  # the segment.attribute whose vocabulary next-item ranks over
    max_train_users: int = 0  # 0: all labelled users of the train split
    # The user representation the head reads.  "cls": the first token's final state, as in the paper.
    # "mean": the mean of the final states of all the user's real tokens.  "auto": mean when starting
    # from a pretrained encoder, cls from scratch.  Why: the pretext task (like the paper's) supervises
    # only masked word positions, never the first token, so a pretrained model's first-token state is
    # untrained when fine-tuning starts, while its word states are what pretraining shaped.  Measured on
    # the demo data, 3 splits each (docs/results/README.md): pretrained is_parent AUC 0.641 (cls) ->
    # 0.704 (mean), next-genre mAP@10 0.195 -> 0.216; from scratch cls is as good or better (is_parent
    # 0.693 vs 0.688, next-genre 0.128 vs 0.110).  "attention": a learned softmax weighting of the real
    # tokens' final states (a vector q . h_t, trained at the head's rate), starting as "mean" (q = 0): lets
    # the task pick the tokens that matter instead of averaging them all.
    pooling: Literal["auto", "cls", "mean", "attention"] = "auto"
    # Pool the mean of the last k layers' states (each through the final LayerNorm) instead of the last one's:
    # the top layer of a pretrained encoder is the most specialised to the pretext task, the ones below it
    # may carry more general features.  1..model layers; 1: the final state.
    pool_layers: int = 1
    # Binary and multiclass: add a linear map of the user's bag of attribute counts, log(1 + count), to the
    # head's logits (zero at start, trained at the head's rate).  Why: counts are what logistic regression
    # reads, and a small encoder fine-tuned on few users may not recover them; the wide part gives the
    # model that baseline's features for free.  Not for next (its scores go through the fused CE on h).
    wide: bool = False
    # next-item tasks rank over an attribute's vocabulary, whose pretext head is already trained to
    # score it: start the task head from that head (pretrained models only).
    init_head_from_pretext: bool = True
    dropout: float | None = None  # hidden dropout while fine-tuning (None: the model's own setting)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.epochs < 1:
            raise ConfigError("batch_size and epochs: must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.test_fraction < 1.0 or self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(f"test_fraction: must be in [0, 1) and leave training users beside val_fraction, "
                              f"got test {self.test_fraction}, val {self.val_fraction}")
        if self.pool_layers < 1:
            raise ConfigError(f"pool_layers: must be >= 1 (and at most the encoder's layers), got {self.pool_layers}")
        if self.probe_epochs < 0 or self.patience < 1:
            raise ConfigError("probe_epochs must be >= 0 and patience >= 1")
        if not 0.0 < self.layer_lr_decay <= 1.0:
            raise ConfigError(f"layer_lr_decay: must be in (0, 1], got {self.layer_lr_decay}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if "." not in self.next_attribute:
            raise ConfigError(f"next_attribute: expected '<segment>.<attribute>', got {self.next_attribute!r}")


@dataclass
class DemoConfig:
    users: int = 3000  # synthetic users generated by `userbert-engine demo`
    seed: int = 0
    shard_users: int = 1000
    # Catalogue sizes of the synthetic shop: a few thousand users cannot teach a model thousands of
    # genres, so the demo uses a denser world than `userbert-engine synth`'s defaults.
    genres: int = 300
    shops: int = 1500

    def __post_init__(self) -> None:
        if self.users < 100:
            raise ConfigError(f"users: the demo needs at least 100 users, got {self.users}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    schema: SchemaConfig | None = None  # present when the file carries [data]/[segments]

    def to_dict(self) -> dict[str, Any]:
        d = {k: to_dict(getattr(self, k)) for k in ("model", "masking", "train", "finetune", "demo")}
        if self.schema is not None:
            d.update(self.schema.to_dict())
        return d

    def log(self, logger: logging.Logger = log) -> None:
        logger.info("config: %s", json.dumps(self.to_dict(), sort_keys=True))


_SCHEMA_TABLES = ("data", "segments", "user_attributes")
_RUN_TABLES = ("model", "masking", "train", "finetune", "demo")


def config_from_dict(raw: dict[str, Any], base_dir: str | Path = ".", where: str = "config") -> RunConfig:
    unknown = set(raw) - {*_RUN_TABLES, *_SCHEMA_TABLES}
    if unknown:
        raise ConfigError(f"{where}: {sorted(unknown)[0]}: unknown top-level table "
                          f"(known: {', '.join(_RUN_TABLES + _SCHEMA_TABLES)})")
    parts = {k: raw[k] for k in _RUN_TABLES if k in raw}
    cfg = from_dict(RunConfig, parts, where)
    if any(k in raw for k in _SCHEMA_TABLES):
        cfg.schema = schema_from_dict(raw, base_dir, where)
    return cfg


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a run config (defaults when ``path`` is None), then apply dotted overrides."""
    raw: dict[str, Any] = {}
    base = Path(".")
    if path is not None:
        path = Path(path)
        raw = read_toml(path)
        base = path.parent
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    where = str(path) if path is not None else "config"
    return config_from_dict(raw, base, where)


@dataclass
class SegmentVocab:
    """What the model must know about one tokenized segment (read from the manifest)."""

    name: str
    attributes: list[str]
    vocab_sizes: list[int]  # per attribute, the two reserved ids included
    dims: list[int]  # per attribute embedding width; the token vector is their concatenation
    num_positions: int  # size of the position table
    max_words: int


@dataclass
class VocabSpec:
    """The data-dependent shape of a model: segments, vocabularies, user attributes."""

    segments: list[SegmentVocab]
    user_attributes: list[str] = field(default_factory=list)
    user_vocab_sizes: list[int] = field(default_factory=list)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> VocabSpec:
        segs = [
            SegmentVocab(name=name, attributes=list(s["attributes"]), vocab_sizes=list(s["vocab_sizes"]),
                         dims=list(s["dims"]), num_positions=int(s["num_positions"]), max_words=int(s["max_words"]))
            for name, s in manifest["segments"].items()
        ]
        ua = manifest.get("user_attributes", {"names": [], "vocab_sizes": []})
        return cls(segs, list(ua["names"]), list(ua["vocab_sizes"]))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VocabSpec:
        return from_dict(cls, d, "vocab_spec")

    def segment(self, name: str) -> SegmentVocab:
        for s in self.segments:
            if s.name == name:
                return s
        raise KeyError(f"no segment {name!r} (have: {[s.name for s in self.segments]})")
