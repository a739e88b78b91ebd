"""Training: optimizer (and, later, state, steps and the loop)."""
