"""``python -m videobooth_core``: see :mod:`videobooth_core.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
