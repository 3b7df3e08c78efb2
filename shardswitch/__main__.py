"""``python -m shardswitch``: the same as the ``shardswitch`` command (see shardswitch.cli)."""

import sys

from shardswitch.cli import main

if __name__ == "__main__":
    sys.exit(main())
