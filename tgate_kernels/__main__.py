"""``python -m tgate_kernels``: the ``tgate-kernels`` command line."""

import sys

from .tools.cli import main

sys.exit(main())
