"""Training loop, model, optimizer and schedule, metrics and loggers."""
