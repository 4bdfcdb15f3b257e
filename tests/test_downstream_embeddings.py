"""`embed`: one row per user in data order, the right schema, batches sorted by length give the same vectors."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from engine.config import ModelConfig, VocabSpec
from engine.data.collate import CollateConfig, Collator
from engine.downstream.user_embeddings import export_embeddings
from engine.model.export import save_model
from engine.model.userbert import UserBERT, user_attr_offsets
from tokenizer.pipeline import tokenize
from tokenizer.schema import load_schema
from tokenizer.shards import open_tokenized
from tokenizer.synthetic import generate


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    generate(root / "raw", 230, seed=5, n_genres=30, n_shops=60, progress=False)
    tokenize(load_schema(root / "raw" / "schema.toml"), root / "tok", progress=False)
    data = open_tokenized(root / "tok")
    spec = VocabSpec.from_manifest(data.manifest)
    cfg = ModelConfig(hidden=24, layers=1, heads=2, dropout=0.0, attn_dropout=0.0)
    torch.manual_seed(0)
    model = UserBERT(cfg, spec)
    save_model(root / "model", model, cfg, spec)
    return root, data, model


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_embeddings_match_the_encoder_in_data_order(exported, tmp_path, pooling):
    root, data, model = exported
    out = tmp_path / "e.parquet"
    # small batches and row groups: several of each, and the last ones partial
    n = export_embeddings(root / "tok", root / "model", out, batch_size=16, device="cpu", progress=False,
                          rows_per_group=100, pooling=pooling)
    table = pq.read_table(out)
    assert n == table.num_rows == data.num_users == 230
    assert table.schema.field("user_id").type == data.user_ids.type
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 24)
    assert pq.ParquetFile(out).metadata.num_row_groups == 3
    assert table.column("user_id").to_pylist() == data.user_ids.to_pylist()
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    collator = Collator(data, user_attr_offsets(model.spec), CollateConfig(select_prob=0.0))
    rows = np.array([0, 57, 101, 229])
    with torch.no_grad():
        model.eval()
        ref = model.user_embedding(collator(rows), pooling).numpy()
    np.testing.assert_allclose(emb[rows], ref, rtol=1e-4, atol=1e-5)
    assert np.isfinite(emb).all() and emb.std(0).min() > 0


def test_embed_rejects_unknown_pooling(exported, tmp_path):
    root, _, _ = exported
    with pytest.raises(ValueError, match="pooling"):
        export_embeddings(root / "tok", root / "model", tmp_path / "x.parquet", pooling="max", progress=False)
    assert not (tmp_path / "x.parquet").exists()


def test_default_pooling_is_mean_for_a_pretrained_model_and_the_trained_one_for_a_finetuned_model(exported,
                                                                                                  tmp_path):
    from engine.downstream.finetune import TaskModel
    from engine.downstream.user_embeddings import default_pooling

    root, data, model = exported
    assert default_pooling(root / "model") == "mean"
    task_model = TaskModel(model, "binary", 1, pooling="cls")
    save_model(tmp_path / "ft" / "model", task_model, model.cfg, model.spec, meta={"task": "binary", "n_outputs": 1,
                                                                                   "pooling": "cls"})
    assert default_pooling(tmp_path / "ft") == "cls"
    export_embeddings(root / "tok", tmp_path / "ft", tmp_path / "a.parquet", progress=False)
    export_embeddings(root / "tok", root / "model", tmp_path / "b.parquet", progress=False, pooling="cls")
    a, b = (np.stack(pq.read_table(tmp_path / f).column("embedding").to_numpy(zero_copy_only=False))
            for f in ("a.parquet", "b.parquet"))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # the fine-tuned dir's encoder is the same encoder
