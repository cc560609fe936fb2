"""Labels from Xenium expression: marker-guided clusters -> named labels + confidence
(`recipe`), and the report of `embed annotate` (`report`)."""
