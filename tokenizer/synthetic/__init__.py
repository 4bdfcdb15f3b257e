"""Synthetic behaviour logs with planted structure (``userbert-engine synth``, the demo, the tests).

``generate`` (tokenizer/synthetic/generator.py) writes the logs, labels and schema; the shared
world is in world.py, the per-user draws in events.py.  realistic.py writes logs shaped like real
ones instead (one event table, Zipf catalogues, heavy users; no planted labels), for the tests
and benchmarks that must not flatter the tokenizer.  Not part of the tokenizer proper: it
only writes the kind of input the tokenizer reads.
"""

from tokenizer.synthetic.generator import generate

__all__ = ["generate"]
