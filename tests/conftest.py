import os

import numpy as np
import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # parallel workers share the cores: no oversubscription
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

os.environ.setdefault("MPLBACKEND", "Agg")


def pyramid_levels(level0: np.ndarray, min_side: int = 256) -> list[np.ndarray]:
    levels = [level0]
    while min(levels[-1].shape[:2]) >= 2 * min_side:
        a = levels[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        levels.append(a[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3)).astype(np.uint8))
    return levels


@pytest.fixture
def gradient_image() -> np.ndarray:
    """A 1536x2048 RGB image whose pixel values encode their own coordinates."""
    h, w = 1536, 2048
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx // 8) % 256, (yy // 8) % 256, ((xx + yy) // 16) % 256], axis=2)
    return img.astype(np.uint8)


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory):
    """A small synthetic dataset (3 slides, ~450 cells), made once per test session."""
    from embedstore.synth import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synth") / "data", seed=7, n_cells=450, n_slides=3)


#: test backbones at a small context size: fast extraction for tests
FAST = dict(local_backbone="test-vit-local", context_backbone="test-vit-context",
            context_input_px=128, batch_size=16, workers=2)  # fmt: skip


@pytest.fixture(scope="session")
def extracted_store(synth_small, tmp_path_factory):
    """`synth_small` extracted once with the test backbones: (db path, extract summary).

    Tests that change its labels must restore them.
    """
    from embedstore.extract.pipeline import ExtractConfig, extract

    db = tmp_path_factory.mktemp("store") / "db"
    cfg = ExtractConfig(**FAST, commit_every=100)
    summary = extract(synth_small.out_dir / "slides", synth_small.cells_path, db, cfg)
    return db, summary


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls: one torch thread avoids OpenMP contention with other test processes."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
