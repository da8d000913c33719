"""``python -m kncore ...`` runs the command line (see :mod:`kncore.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
