"""``python -m cli``: the ``regcl`` command."""

import sys

from cli.main import main

sys.exit(main())
