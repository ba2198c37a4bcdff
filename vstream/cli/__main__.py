"""`python -m vstream.cli ...` = the `vstream` command."""

from vstream.cli import main

main()
