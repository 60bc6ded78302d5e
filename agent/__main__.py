"""``python -m agent``: the ``edge-agent`` command."""

import sys

from agent.cli import main

sys.exit(main())
