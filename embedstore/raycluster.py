"""Ray, when a command runs with `--engine ray`: import it with a clear error, start or join it.

Shared by the three Ray engines (extraction, index building, predictions). Ray is optional:
`pip install .[ray]`.
"""

from __future__ import annotations

import os
import warnings

from .errors import UserError


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise UserError("--engine ray needs Ray: pip install .[ray]  (or pip install 'ray>=2.9')") from exc
    return ray


def start_ray(ray, address: str | None, workers: int) -> bool:
    """Start a local Ray (or join `address`); True when this call started it."""
    if ray.is_initialized():
        return False
    with warnings.catch_warnings():  # lance/lancedb warn at fork; Ray's fork is followed by exec
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", "lance is not fork-safe")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # GPUs are detected by Ray; every worker gets a CPU slot even on a small machine
            ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    return True
