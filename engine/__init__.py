"""The torch side: run configs (config.py) and four rooms, bottom to top: data/, model/, train/,
downstream/ (docs/ARCHITECTURE.md); demo.py runs the whole pipeline."""
