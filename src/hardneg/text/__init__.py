"""Text: model loading, offline hard-negative mining and the offline text benchmark.

Needs the ``text`` extra: ``pip install 'hardneg[text]'``.
"""
