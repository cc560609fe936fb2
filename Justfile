# Recipes. Run them through ./justw, which sets up .venv on first use.
set shell := ["bash", "-euo", "pipefail", "-c"]

# list the recipes
default:
    @just --list

# the main job end to end on built-in synthetic data, offline
demo out="demo_out" cells="3000" seed="0":
    python -m cli.demo --out {{out}} --cells {{cells}} --seed {{seed}}

# the test suite (no network, no real weights, no GPU needed), one worker per core (pytest-xdist)
test *args:
    python -m pytest -n auto --dist loadfile {{args}}

# lint
lint:
    ruff check embedstore heads cli tests bench

# crops/s: batch reader vs one read_region per cell (JSON)
bench-crops *args:
    python bench/crops.py {{args}}

# extraction: pipeline vs naive, model share, memory (JSON); --real on a GPU
bench-extract *args:
    python bench/extract.py {{args}}

# store: write/load 500k x (1536 + 1024) float16 (--rows) vs numpy.load (JSON)
bench-store *args:
    python bench/store.py {{args}}

# heads: --stage all on 200k cached cells on CPU (JSON)
bench-heads *args:
    python bench/heads.py {{args}}

# search: 1M clustered 1536-d vectors, latency/recall/audit (JSON)
bench-search *args:
    python bench/search.py {{args}}

# kill -9 the writing commands at random moments and inside commits; rows lost/duplicated (JSON)
bench-faults *args:
    python bench/faults.py {{args}}

# test-split numbers next to val (selection bias), safety rule, conformal coverage (JSON)
bench-honest *args:
    python bench/honest.py {{args}}

# embed annotate on 100k cells x 300 genes: time per step, peak RSS, label accuracy (JSON)
bench-annotate *args:
    python bench/annotate.py {{args}}

# tiled vs exact context mode: speed, agreement, heads macro-F1 (JSON)
bench-context *args:
    python bench/context.py {{args}}

# the one-shot GPU benchmark (CPU check: just bench-gpu --device cpu --small)
bench-gpu *args:
    bash bench/gpu.sh {{args}}

# a real H&E tile (stardist's histo.jpg) through segmentation, embed cells, extract and export (JSON)
bench-ecosystem *args:
    python bench/ecosystem.py {{args}}

# "cells like this one": share of neighbours with the query's label, hc-nucleus vs test backbones (JSON)
bench-neighbours *args:
    python bench/neighbours.py {{args}}

# heads report on a 200k-cell run (fake vectors, real slide crops for the galleries): seconds, bytes (JSON)
bench-report *args:
    python bench/report.py {{args}}

# heads eval's figures: drawn once (save_png) vs savefig(bbox_inches="tight"), CPU s and ratio (JSON)
bench-plots *args:
    python bench/plots.py {{args}}

# Ray (needs the ray extra): extraction 1 vs 2 workers, a big slide in shards, a file:// URI store (JSON)
bench-ray-extract *args:
    python bench/ray_extract.py {{args}}

# heads predict on Ray: 1 vs 2 workers against the single-process predict (JSON)
bench-ray-predict *args:
    python bench/ray_predict.py {{args}}

# predictions table: a slide's upsert as the table grows vs a plain append (JSON)
bench-predictions *args:
    python bench/predictions.py {{args}}

# the FAISS index built on Ray: 1 and 2 workers against the single-process build, recall, bytes/row (JSON)
bench-ray-index *args:
    python bench/ray_index.py {{args}}
