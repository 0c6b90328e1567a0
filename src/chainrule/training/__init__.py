"""Training: optimizers and schedules, compiled steps, the loop."""
