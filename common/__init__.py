"""Generic helpers below every other package: typed configs, atomic file writing, progress bars.

Nothing here imports torch or another package of this repository (docs/ARCHITECTURE.md).
"""
