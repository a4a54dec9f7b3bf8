"""``python -m coqat``: the same as the ``coqat`` command."""

from coqat.cli import main

main()
