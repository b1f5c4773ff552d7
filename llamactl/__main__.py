"""`python -m llamactl` runs the CLI."""

from llamactl.cli import main

main()
