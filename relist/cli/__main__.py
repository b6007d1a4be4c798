"""``python -m relist.cli`` (and ``torchrun ... -m relist.cli``) run the `relist` command."""

import sys

from relist.cli import main

sys.exit(main())
