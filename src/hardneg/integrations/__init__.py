"""Bridges from hardneg's losses to other training libraries.

* :mod:`hardneg.integrations.sentence_transformers` — every registered strategy as a
  sentence-transformers loss (``pip install 'hardneg[text]'``).

Submodules import their library lazily: importing this package needs none of them.
"""
