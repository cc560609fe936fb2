# Recipes. Run them through ./justw, which sets up .venv on first use.
set shell := ["bash", "-euo", "pipefail", "-c"]

out := "demo_out"

# list the recipes
default:
    @just --list

# the main job end to end on built-in synthetic data, offline
demo seed="0" cells="1500":
    python -m cli.demo --out {{out}} --seed {{seed}} --cells {{cells}}

# the test suite (no network, no real weights, no GPU needed)
test *args:
    python -m pytest {{args}}

# lint
lint:
    ruff check embedstore heads cli tests bench

# benchmarks (each prints JSON)
bench-crops *args:
    python bench/crops.py {{args}}
