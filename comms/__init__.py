"""Process groups and communication helpers."""
