"""YAML experiments shipped with loomtrain (package data)."""
