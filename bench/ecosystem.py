"""A real H&E tile through the ecosystem path, as a user runs it (JSON on stdout).

The tile is the public H&E example shipped in the `stardist` wheel
(`stardist/data/images/histo.jpg`, 500 x 300 px, from The Cancer Imaging Archive; its µm/px
is not recorded, 0.5 is assumed). Get it without installing stardist:

    pip download --no-deps stardist -d /tmp/sd && unzip -o /tmp/sd/stardist-*.whl \
        'stardist/data/images/histo.jpg' -d /tmp/sd

Nuclei are segmented here with a classical recipe (hematoxylin by colour deconvolution, Otsu,
distance-transform watershed; scikit-image), standing in for StarDist/InstanSeg, and written as
the two files segmenters hand over: a label image (TIFF, one integer per nucleus) and a
QuPath-style GeoJSON of detection polygons classified "large"/"small" by area. Each goes through
`embed cells` -> `embed extract` -> `embed export --format anndata`, and the .h5ad is reopened
with anndata. The centroids of both routes are compared (polygon area centroid vs label mean).

    python bench/ecosystem.py --image /tmp/sd/stardist/data/images/histo.jpg --out /tmp/eco
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def segment(rgb: np.ndarray, min_area_px: int = 30) -> np.ndarray:
    """Label image of nuclei: H channel -> Otsu -> fill -> distance-transform watershed."""
    from scipy import ndimage as ndi
    from skimage import color, feature, filters, morphology, segmentation

    h = ndi.gaussian_filter(color.rgb2hed(rgb)[..., 0], 1.0)
    mask = h > filters.threshold_otsu(h)
    mask = ndi.binary_fill_holes(morphology.remove_small_objects(mask, max_size=min_area_px))
    dist = ndi.distance_transform_edt(mask)
    peaks = feature.peak_local_max(dist, min_distance=4, labels=ndi.label(mask)[0], exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = segmentation.watershed(-dist, markers, mask=mask)
    sizes = np.bincount(labels.ravel())
    labels[sizes[labels] < min_area_px] = 0
    return segmentation.relabel_sequential(labels)[0].astype(np.int32)


def qupath_geojson(labels: np.ndarray) -> dict:
    """QuPath detections: one polygon per label (contour at the label's border), pixel corners
    as in QuPath (pixel (r, c) covers [c, c+1) x [r, r+1))."""
    from skimage import measure

    sizes = np.bincount(labels.ravel())
    median = np.median(sizes[1:])
    features = []
    for region in measure.regionprops(labels):
        r0, c0, _, _ = region.bbox
        padded = np.pad(region.image, 1).astype(float)
        contour = max(measure.find_contours(padded, 0.5), key=len)  # (row, col) in padded px
        # contour points run through pixel centres at 0.5 between in/out: shift to corners
        ring = [[float(c - 1 + c0 + 0.5), float(r - 1 + r0 + 0.5)] for r, c in contour]
        if ring[0] != ring[-1]:
            ring.append(ring[0])
        cls = "large" if region.area >= median else "small"
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"histo/{region.label}")),
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "detection", "name": str(region.label),
                           "classification": {"name": cls, "color": [200, 0, 0] if cls == "large" else [0, 0, 200]}},
        })  # fmt: skip
    return {"type": "FeatureCollection", "features": features}


def embed(*args) -> float:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cli.embed", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        sys.exit(f"embed {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return time.perf_counter() - t


def route(name: str, source: Path, image: Path, out: Path, mpp: float, extra: list[str], backbone: str) -> dict:
    """embed cells -> extract -> export for one segmenter output; the reopened AnnData's facts."""
    import anndata

    cells, db, h5ad = out / f"cells_{name}.parquet", out / f"db_{name}", out / f"{name}.h5ad"
    times = {"cells": embed("cells", source, "--out", cells, "--slides", image, "--mpp", mpp, "--tissue", "unknown", *extra)}
    times["extract"] = embed("extract", image, "--cells", cells, "--db", db, "--mpp", mpp, "--local-backbone", backbone,
                             "--context-backbone", "test-vit-context", "--context-px", 128, "--quiet")  # fmt: skip
    times["export"] = embed("export", "--db", db, "--out", h5ad)
    adata = anndata.read_h5ad(h5ad)
    return {
        "n_obs": adata.n_obs,
        "obsm": {k: list(v.shape) for k, v in adata.obsm.items()},
        "obs_columns": list(adata.obs.columns),
        "labels": adata.obs["label"].value_counts().to_dict() if "label" in adata.obs else None,
        "uns_keys": list(adata.uns.keys()),
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "centroids": adata.obs[["x_px", "y_px"]].to_numpy(),
        "cell_ids": adata.obs["cell_id"].astype(str).to_numpy(),
    }


def main() -> None:
    import polars as pl
    import tifffile
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", type=Path, required=True, help="stardist/data/images/histo.jpg")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mpp", type=float, default=0.5, help="µm/px assumed for the tile")
    ap.add_argument("--local-backbone", default="hc-nucleus")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rgb = np.asarray(Image.open(args.image).convert("RGB"))
    labels = segment(rgb)
    tifffile.imwrite(args.out / "histo_labels.tif", labels)
    (args.out / "histo_detections.geojson").write_text(json.dumps(qupath_geojson(labels)))

    geo = route("geojson", args.out / "histo_detections.geojson", args.image, args.out, args.mpp,
                ["--labels-from", "classification"], args.local_backbone)  # fmt: skip
    lab = route("labels", args.out / "histo_labels.tif", args.image, args.out, args.mpp, [], args.local_backbone)
    # the GeoJSON names each polygon after its label: compare the two centroids per nucleus
    a = pl.DataFrame({"label": lab["cell_ids"], "x": lab["centroids"][:, 0], "y": lab["centroids"][:, 1]})
    names = json.loads((args.out / "histo_detections.geojson").read_text())["features"]
    id_to_label = {f["id"]: f["properties"]["name"] for f in names}
    b = pl.DataFrame({"label": [id_to_label.get(i, i) for i in geo["cell_ids"]], "gx": geo["centroids"][:, 0], "gy": geo["centroids"][:, 1]})
    both = a.join(b, on="label")
    shift = np.hypot(both["x"] - both["gx"], both["y"] - both["gy"]).to_numpy()
    for r in (geo, lab):
        r.pop("centroids"), r.pop("cell_ids")
    print(json.dumps({
        "image": str(args.image), "size_px": list(rgb.shape[1::-1]), "mpp_assumed": args.mpp,
        "nuclei_segmented": int(labels.max()), "local_backbone": args.local_backbone,
        "geojson_route": geo, "label_image_route": lab,
        "centroid_agreement_px": {"matched": int(both.height), "median": float(np.median(shift)),
                                  "p95": float(np.percentile(shift, 95)), "max": float(shift.max())},
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
