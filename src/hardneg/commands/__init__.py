"""Sub-commands of the ``hardneg`` CLI (one module each: ``add_arguments`` and ``run``)."""
