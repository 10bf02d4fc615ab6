"""``python -m freshrec``: the ``freshrec`` command."""

import sys

from freshrec.cli import main

sys.exit(main())
