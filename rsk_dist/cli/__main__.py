"""``python -m rsk_dist.cli``: what jobs on a cluster run (py_modules ships no console script)."""
import sys

from rsk_dist.cli import main

sys.exit(main())
