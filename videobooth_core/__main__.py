"""``python -m videobooth_core``: see :mod:`videobooth_core.app.cli`."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
