"""``python -m limiter``: the same command line as the ``limiter`` console script."""

from limiter.cli import main

main()
