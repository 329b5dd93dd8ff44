"""OptiQ train."""
