"""Reading and writing the formats of the field: slides, cell tables, segmenter outputs,
Xenium bundles, and exports (AnnData, SpatialData, CSV, QuPath GeoJSON)."""
