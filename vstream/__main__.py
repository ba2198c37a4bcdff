"""`python -m vstream ...` = the `vstream` command (torchrun uses it:
`torchrun --nproc_per_node N -m vstream train ...`)."""

from vstream.cli import main

main()
