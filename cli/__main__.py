"""``python -m cli``: the ``regcl`` command."""

import sys

from cli.main import main

if __name__ == "__main__":  # spawned worker processes (regcl bench cl --workers) import this
    sys.exit(main())
