"""Measure the reference centres/scales of the `hc-nucleus` features on real H&E (run once).

    python bench/hc_reference.py [IMAGE] [--mpp 0.5]            # JSON on stdout
    python bench/hc_reference.py --python                        # the REFERENCE lines to paste

Default image: /tmp/histo/histo.jpg, the 500x300 H&E tile shipped in the stardist wheel
(public), taken at 0.5 µm/px. Nuclei are found in the whole tile with the module's own
segmentation; every nucleus at least half a local field (28 µm) from the edge gets the 56 µm
crop the extraction would cut, resized to 224 px by `Backbone.preprocess`, and its raw
features. The centre is their median, the scale IQR/1.349 (embedstore.extract.handcrafted
`reference_constants`). Paste the --python output into embedstore/extract/handcrafted.py and bump
FEATURES_VERSION when the numbers change.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from embedstore.extract import handcrafted as hc
from embedstore.extract.backbones import build_backbone

DEFAULT_IMAGE = Path("/tmp/histo/histo.jpg")


def nucleus_centres(rgb: np.ndarray, mpp: float, margin_px: int) -> np.ndarray:
    """(n, 2) integer (row, col) centroids of the nuclei at least `margin_px` from the edge."""
    from skimage.measure import regionprops

    h = hc.stains(rgb.astype(np.float32) / 255)[..., 0]
    cents = np.array([p.centroid for p in regionprops(hc.nuclei_labels(h, mpp))])
    cents = np.round(cents).astype(int)
    hgt, wid = rgb.shape[:2]
    keep = ((cents[:, 0] >= margin_px) & (cents[:, 0] <= hgt - margin_px)
            & (cents[:, 1] >= margin_px) & (cents[:, 1] <= wid - margin_px))
    return cents[keep]


def reference(image: Path, mpp: float) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(centre, scale, crops, nuclei found at the crop centre) of the raw features."""
    rgb = np.asarray(Image.open(image).convert("RGB"))
    half = int(round(hc.FIELD_UM / mpp / 2))
    cents = nucleus_centres(rgb, mpp, half)
    crops = np.stack([rgb[r - half:r + half, c - half:c + half] for r, c in cents])
    model = build_backbone("hc-nucleus")
    with torch.inference_mode():
        x = model.preprocess(torch.from_numpy(np.ascontiguousarray(crops)))
    pixels = x.permute(0, 2, 3, 1).numpy()
    raw = hc.raw_features(pixels, hc.FIELD_UM / pixels.shape[1])
    centre, scale = hc.reference_constants(raw)
    found = int(np.nansum(raw[:, hc.FEATURE_NAMES.index("found")]))
    return centre, scale, len(raw), found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", nargs="?", type=Path, default=DEFAULT_IMAGE)
    ap.add_argument("--mpp", type=float, default=0.5, help="µm per pixel of the image")
    ap.add_argument("--python", action="store_true", help="print the constants to paste")
    args = ap.parse_args()
    centre, scale, n, found = reference(args.image, args.mpp)
    source = f"{args.image.name}, {args.mpp} um/px"
    if args.python:
        print(f'REFERENCE = {{"source": "{source}", "n_crops": {n}, "n_found": {found}}}')
        print("_REF = {  # name: (centre, scale)")
        for name, c, s in zip(hc.FEATURE_NAMES, centre, scale, strict=True):
            print(f'    "{name}": ({c:.6g}, {s:.6g}),')
        print("}")
        return
    print(json.dumps({
        "source": source, "features_version": hc.FEATURES_VERSION, "n_crops": n,
        "n_found": found,
        "centre": dict(zip(hc.FEATURE_NAMES, np.round(centre, 6).tolist(), strict=True)),
        "scale": dict(zip(hc.FEATURE_NAMES, np.round(scale, 6).tolist(), strict=True)),
    }, indent=1))


if __name__ == "__main__":
    main()
