"""``python -m memzoo`` — the same as the ``memzoo`` command."""

import sys

from memzoo.cli import entry_point

if __name__ == "__main__":
    sys.exit(entry_point())
