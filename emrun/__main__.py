"""`python -m emrun` is the `emrun` command."""

from .cli import main

main()
