"""Lightweight NuClass heads trained on cached per-cell vectors."""
