"""``python -m dlearner.cli``: the ``dlearner`` command without its console script."""

import sys

from dlearner.cli import main

sys.exit(main())
