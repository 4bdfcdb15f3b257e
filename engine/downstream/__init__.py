"""Using a pretrained model: tasks and splits, fine-tuning (on the loop of engine/train/), baselines,
evaluation, metrics and user-embedding export.  docs/DOWNSTREAM.md."""
