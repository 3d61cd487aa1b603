"""``python -m servetune``: the same as the ``servetune`` command."""

from servetune.cli import main

main()
