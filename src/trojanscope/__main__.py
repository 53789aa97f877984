"""``python -m trojanscope``: the same as the ``trojanscope`` command."""

import sys

from .cli import main

main(sys.argv[1:])
