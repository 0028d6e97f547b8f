"""Pure policy: decisions about who may do what, with the clock and randomness passed in (no I/O)."""
