"""What the synthetic slides contain: classes, nucleus looks, regions, tissues and genes.

All of it is data. Sizes are in µm (converted to pixels with the slide's µm/px when drawn).
The table is built so that the class shows partly in the nucleus and partly only in the
surroundings (see docs/synthetic-data.md):

- same nucleus, different place: Fibroblast / Tumor_Associated_Fibroblast (normal vs
  desmoplastic stroma), Endothelial / Endothelial_TumorAssociated (vessels in normal tissue vs
  vessels in tumour);
- same place, different nucleus: T_Cell / B_Cell (lymphoid aggregates), Macrophage / Fibroblast
  (stroma);
- both: Epithelial_Malignant (tumour nests) / Ductal (glands).
"""

from __future__ import annotations

from dataclasses import dataclass

CLASSES: tuple[str, ...] = (
    "Epithelial_Malignant",
    "Ductal",
    "Fibroblast",
    "Tumor_Associated_Fibroblast",
    "Smooth_Muscle",
    "Endothelial",
    "Endothelial_TumorAssociated",
    "T_Cell",
    "B_Cell",
    "Macrophage",
)

TISSUES: tuple[str, ...] = ("breast", "lung", "pancreas")

REGIONS: tuple[str, ...] = (
    "normal_stroma",
    "desmoplastic_stroma",
    "tumour_nest",
    "gland",
    "lymphoid_aggregate",
    "vessel_rich",
    "muscle",
    "adipose",
)
RID = {name: i for i, name in enumerate(REGIONS)}
TUMOUR_REGIONS = (RID["tumour_nest"], RID["desmoplastic_stroma"])


@dataclass(frozen=True)
class Morph:
    """Distribution of one nucleus look. (mean, sd) pairs; lengths are full axes in µm."""

    length: tuple[float, float]
    aspect: tuple[float, float]  # length / width, >= 1
    od: tuple[float, float]  # haematoxylin optical density inside the nucleus
    contrast: tuple[float, float]  # chromatin texture amplitude (relative)
    grain: tuple[float, float, float]  # probabilities of fine / medium / coarse chromatin
    irregular: float  # amplitude of outline harmonics
    taper: float  # 0: ellipse; >0: pointed spindle ends
    blunt: float  # end exponent: 2 elliptic ends, 4 cigar-shaped blunt ends
    nucleolus: float  # probability of a visible nucleolus
    halo: tuple[float, float]  # cytoplasm rim in µm around the nucleus
    halo_od: tuple[float, float]  # (haematoxylin, eosin) OD of that cytoplasm
    foamy: float  # granular texture of the cytoplasm (macrophages)


MORPHS: dict[str, Morph] = {
    "lymph_t": Morph((6.6, 0.5), (1.07, 0.05), (1.30, 0.12), (0.12, 0.04), (0.8, 0.2, 0.0),
                     0.03, 0.0, 2.0, 0.0, (0.6, 0.2), (0.10, 0.15), 0.0),
    "lymph_b": Morph((7.6, 0.6), (1.12, 0.06), (1.12, 0.12), (0.30, 0.06), (0.0, 0.3, 0.7),
                     0.05, 0.0, 2.0, 0.10, (1.0, 0.3), (0.12, 0.20), 0.0),
    "macrophage": Morph((11.0, 1.3), (1.45, 0.20), (0.62, 0.10), (0.22, 0.05), (0.2, 0.7, 0.1),
                        0.10, 0.0, 2.0, 0.40, (6.0, 1.5), (0.06, 0.30), 0.6),
    "spindle": Morph((14.0, 2.5), (4.0, 0.8), (0.95, 0.12), (0.15, 0.05), (0.7, 0.3, 0.0),
                     0.04, 0.7, 2.0, 0.05, (0.0, 0.0), (0.04, 0.10), 0.0),
    "smooth_muscle": Morph((16.0, 2.5), (3.6, 0.6), (0.75, 0.10), (0.12, 0.04), (0.7, 0.3, 0.0),
                           0.03, 0.0, 4.0, 0.10, (3.0, 0.8), (0.05, 0.62), 0.0),
    "endothelial": Morph((11.0, 1.5), (3.8, 0.7), (1.10, 0.12), (0.10, 0.04), (0.8, 0.2, 0.0),
                         0.04, 0.35, 2.0, 0.0, (0.0, 0.0), (0.05, 0.15), 0.0),
    "malignant": Morph((13.0, 2.2), (1.30, 0.20), (1.25, 0.18), (0.35, 0.08), (0.0, 0.3, 0.7),
                       0.12, 0.0, 2.0, 0.70, (4.0, 1.0), (0.20, 0.35), 0.0),
    "ductal": Morph((9.0, 0.9), (1.20, 0.10), (0.90, 0.10), (0.15, 0.04), (0.5, 0.5, 0.0),
                    0.04, 0.0, 2.0, 0.10, (3.5, 0.8), (0.12, 0.40), 0.0),
}

CLASS_MORPH: dict[str, str] = {
    "Epithelial_Malignant": "malignant",
    "Ductal": "ductal",
    "Fibroblast": "spindle",
    "Tumor_Associated_Fibroblast": "spindle",
    "Smooth_Muscle": "smooth_muscle",
    "Endothelial": "endothelial",
    "Endothelial_TumorAssociated": "endothelial",
    "T_Cell": "lymph_t",
    "B_Cell": "lymph_b",
    "Macrophage": "macrophage",
}


@dataclass(frozen=True)
class RegionLook:
    """Background of a region kind: stain ODs, fibre and granularity amplitude, fat."""

    od_h: float
    od_e: float
    fibres: float
    granular: float
    fat: float
    density: float  # relative cell density (cells per area), scaled to the requested mean
    vessels: float  # share of the region's cells that are endothelial (on vessel walls)
    free_mix: dict[str, float]  # class mix of cells not on glands / vessels


REGION_LOOKS: dict[str, RegionLook] = {
    "normal_stroma": RegionLook(0.05, 0.50, 0.28, 0.08, 0.0, 1.0, 0.10,
                                {"Fibroblast": 0.62, "Macrophage": 0.20, "T_Cell": 0.08,
                                 "B_Cell": 0.03, "Smooth_Muscle": 0.07}),
    "desmoplastic_stroma": RegionLook(0.08, 0.42, 0.22, 0.14, 0.0, 1.4, 0.16,
                                      {"Tumor_Associated_Fibroblast": 0.66, "Macrophage": 0.12,
                                       "T_Cell": 0.12, "B_Cell": 0.03,
                                       "Epithelial_Malignant": 0.07}),
    "tumour_nest": RegionLook(0.20, 0.32, 0.0, 0.20, 0.0, 8.0, 0.03,
                              {"Epithelial_Malignant": 0.90, "T_Cell": 0.05, "Macrophage": 0.03,
                               "Tumor_Associated_Fibroblast": 0.02}),
    "gland": RegionLook(0.06, 0.38, 0.18, 0.10, 0.0, 2.2, 0.06,
                        {"Fibroblast": 0.50, "T_Cell": 0.15, "Macrophage": 0.15, "B_Cell": 0.05,
                         "Smooth_Muscle": 0.15}),
    "lymphoid_aggregate": RegionLook(0.26, 0.20, 0.0, 0.20, 0.0, 12.0, 0.04,
                                     {"T_Cell": 0.55, "B_Cell": 0.39, "Macrophage": 0.06}),
    "vessel_rich": RegionLook(0.07, 0.40, 0.20, 0.10, 0.0, 1.6, 0.40,
                              {"Fibroblast": 0.40, "Smooth_Muscle": 0.30, "Macrophage": 0.15,
                               "T_Cell": 0.15}),
    "muscle": RegionLook(0.09, 0.78, 0.08, 0.05, 0.0, 1.3, 0.08,
                         {"Smooth_Muscle": 0.85, "Fibroblast": 0.10, "Macrophage": 0.05}),
    "adipose": RegionLook(0.02, 0.05, 0.0, 0.0, 1.0, 0.25, 0.25,
                          {"Fibroblast": 0.50, "Macrophage": 0.30, "T_Cell": 0.20}),
}

# zone kinds (Voronoi compartments) and the region kinds they become
ZONES: tuple[str, ...] = ("tumour", "stroma", "gland", "lymphoid", "vessel", "muscle", "adipose")
REQUIRED_ZONES: tuple[str, ...] = ("tumour", "stroma", "gland", "lymphoid", "vessel", "muscle")


@dataclass(frozen=True)
class TissueStyle:
    """Per-organ shifts: stain colour, zone frequencies, class-mix multipliers, ambient genes."""

    h_shift: tuple[float, float, float]
    e_shift: tuple[float, float, float]
    zone_weights: dict[str, float]
    mix_boost: dict[str, float]
    ambient_genes: tuple[str, ...]


TISSUE_STYLES: dict[str, TissueStyle] = {
    "breast": TissueStyle((0.0, 0.0, 0.0), (0.02, -0.02, 0.03),
                          {"tumour": 1.0, "stroma": 2.0, "gland": 1.0, "lymphoid": 0.6,
                           "vessel": 0.6, "muscle": 0.4, "adipose": 1.6},
                          {"Fibroblast": 1.2}, ("ESR1", "PGR")),
    "lung": TissueStyle((-0.03, 0.0, 0.05), (0.0, 0.0, -0.02),
                        {"tumour": 1.0, "stroma": 1.0, "gland": 0.6, "lymphoid": 1.5,
                         "vessel": 1.5, "muscle": 0.6, "adipose": 0.2},
                        {"Macrophage": 1.6}, ("SFTPC", "SFTPB")),
    "pancreas": TissueStyle((0.03, 0.0, -0.03), (0.03, 0.02, 0.05),
                            {"tumour": 1.0, "stroma": 1.0, "gland": 2.0, "lymphoid": 0.6,
                             "vessel": 0.8, "muscle": 0.6, "adipose": 0.4},
                            {"Ductal": 1.2}, ("PRSS1", "CPA1")),
}

# Ruifrok-style stain OD vectors; eosin is bent towards red-pink for a realistic stroma colour
STAIN_H: tuple[float, float, float] = (0.65, 0.70, 0.29)
STAIN_E: tuple[float, float, float] = (0.10, 0.87, 0.48)

# ---------------------------------------------------------------------------- gene panel
# mean counts per gene and class (at a typical library size) come from these marker sets
MARKERS: dict[str, dict[str, float]] = {
    "Epithelial_Malignant": {"EPCAM": 6, "KRT8": 8, "KRT18": 7, "KRT19": 6, "CDH1": 3,
                             "CEACAM6": 6, "MKI67": 2.5, "TOP2A": 2, "ERBB2": 3, "MUC1": 3,
                             "CCND1": 3, "TACSTD2": 4},
    "Ductal": {"EPCAM": 5, "KRT8": 6, "KRT18": 5, "KRT19": 7, "CDH1": 3, "KRT7": 5, "SOX9": 3,
               "CFTR": 2.5, "MUC1": 2, "KRT5": 1.5},
    "Fibroblast": {"DCN": 7, "LUM": 6, "PDGFRA": 3, "COL1A1": 5, "COL1A2": 5, "VIM": 3,
                   "SFRP2": 2},
    "Tumor_Associated_Fibroblast": {"DCN": 3, "LUM": 4, "PDGFRA": 2, "COL1A1": 7, "COL1A2": 6,
                                    "VIM": 3, "FAP": 5, "POSTN": 6, "CTHRC1": 4, "COL11A1": 3,
                                    "MMP11": 2.5, "INHBA": 2},
    "Smooth_Muscle": {"ACTA2": 8, "MYH11": 5, "DES": 5, "CNN1": 4, "TAGLN": 6, "VIM": 1},
    "Endothelial": {"PECAM1": 6, "VWF": 6, "CDH5": 4, "CLDN5": 3, "AQP1": 3, "VIM": 2},
    "Endothelial_TumorAssociated": {"PECAM1": 6, "VWF": 4, "CDH5": 4, "PLVAP": 6, "ESM1": 4,
                                    "COL4A1": 3, "ANGPT2": 2, "KDR": 2.5, "VIM": 2},
    "T_Cell": {"PTPRC": 5, "CD3E": 5, "CD3D": 4, "CD2": 3, "CD8A": 2, "CD4": 1.5, "IL7R": 2,
               "CCL5": 2},
    "B_Cell": {"PTPRC": 5, "MS4A1": 5, "CD79A": 5, "CD19": 2.5, "BANK1": 2, "CD74": 4,
               "IGHM": 3},
    "Macrophage": {"PTPRC": 3, "CD68": 6, "CD163": 4, "C1QA": 4, "LYZ": 5, "CD14": 3,
                   "MRC1": 2.5, "CD74": 3, "FCGR3A": 2},
}
#: a cell type of the tissue that no class of the annotation panel covers (expression only)
UNCOVERED_TYPE = "Mast_Cell"
UNCOVERED_MARKERS: dict[str, float] = {"TPSAB1": 8, "CPA3": 6, "KIT": 4, "MS4A2": 4, "HDC": 3}
OTHER_GENES: tuple[str, ...] = ("MYC", "SPP1", "ESR1", "PGR", "SFTPC", "SFTPB", "PRSS1", "CPA1",
                                "GAPDH", "HIF1A", "JUN", "FOS", *UNCOVERED_MARKERS)
N_NEGATIVE_PROBES = 8
N_CONTROL_CODEWORDS = 4  # "Negative Control Codeword" features
N_UNASSIGNED_CODEWORDS = 4  # "Unassigned Codeword" features
#: shares of cells with expression trouble (the rest are clean single cells)
EMPTY_SHARE = 0.02  # near-zero library (a failed segmentation or a cell outside the section)
DOUBLET_SHARE = 0.05  # two cells' transcripts in one segment
UNCOVERED_SHARE = 0.03  # the uncovered type
#: the annotation panel shipped with synthetic bundles: the strongest markers of each class
PANEL_MARKERS_PER_CLASS = 5


def annotation_panel() -> list[tuple[str, str]]:
    """(class, gene) rows of the `panel.csv` written next to synthetic bundles: each class's
    `PANEL_MARKERS_PER_CLASS` highest-mean markers (ties in listing order). No row for the
    uncovered type."""
    rows = []
    for cname, markers in MARKERS.items():
        top = sorted(markers.items(), key=lambda kv: -kv[1])[:PANEL_MARKERS_PER_CLASS]
        rows += [(cname, g) for g, _ in top]
    return rows


def gene_panel() -> tuple[str, ...]:
    """All panel genes in a fixed order: markers first (in class order), then the others."""
    genes: list[str] = []
    for markers in MARKERS.values():
        genes.extend(g for g in markers if g not in genes)
    genes.extend(g for g in OTHER_GENES if g not in genes)
    return tuple(genes)
