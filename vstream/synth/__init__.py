"""Synthetic video: test clips (`clips`) and the procedural streaming world with questions (`world`, a package whose
names are imported from `vstream.synth.world`)."""
