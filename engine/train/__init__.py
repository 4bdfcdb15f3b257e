"""Training: the one loop of both phases (loop.py), its backends, optimizer and schedule (optim.py),
checkpoints, process groups, DeepSpeed configs, telemetry, and pretraining (pretrain.py).
docs/TRAINING.md, docs/ARCHITECTURE.md."""
