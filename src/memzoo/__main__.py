"""``python -m memzoo`` — the same as the ``memzoo`` command."""

from memzoo.cli import main

if __name__ == "__main__":
    main()
