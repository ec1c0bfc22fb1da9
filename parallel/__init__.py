"""Device mesh and the apply_* functions that lay a model over it."""
