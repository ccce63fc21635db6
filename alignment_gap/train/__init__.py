"""Train state, the jitted update step, and (later) the trainer loops."""
