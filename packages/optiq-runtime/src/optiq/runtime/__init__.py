"""OptiQ runtime."""
