"""``python -m hardneg`` runs the command line (the same as the ``hardneg`` script)."""

import sys

from hardneg.cli import main

sys.exit(main())
