"""Per-cell embedding store: slides -> cells -> crops -> backbone vectors -> LanceDB."""

__version__ = "0.1.0"
