"""The floor every wing stands on: the environment's settings and the error hierarchy (no project imports)."""
