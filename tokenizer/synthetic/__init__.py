"""Synthetic behaviour logs with planted structure (``userbert-engine synth``, the demo, the tests).

``generate`` (tokenizer/synthetic/generator.py) writes the logs, labels and schema; the shared
world is in world.py, the per-user draws in events.py.  Not part of the tokenizer proper: it
only writes the kind of input the tokenizer reads.
"""

from tokenizer.synthetic.generator import generate

__all__ = ["generate"]
