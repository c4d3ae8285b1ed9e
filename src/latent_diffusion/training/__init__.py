"""Training loops, checkpointing and resumption."""
