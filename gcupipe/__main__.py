"""`python -m gcupipe` is the `gcupipe` command."""

from gcupipe.cli import main

main()
