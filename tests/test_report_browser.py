"""The run report in a real browser: every figure loads, no console errors, a screenshot."""

import base64
import io

import numpy as np
from PIL import Image

from tests.browser import check_page


def _png_uri() -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_the_browser_check_sees_broken_images_and_console_errors(tmp_path):
    """The harness itself can fail: a truncated data URI and a script error are reported."""
    page = tmp_path / "p.html"
    page.write_text(
        f"<html><body><section id='a'><img alt='good' src='{_png_uri()}'>"
        f"<img alt='broken' src='{_png_uri()[:60]}'></section>"
        "<script>console.error('boom')</script></body></html>"
    )
    seen = check_page(page, tmp_path / "shot.png")
    assert seen.images == 2 and seen.broken_images == ["broken"]
    assert seen.console_errors == ["boom"] and seen.section_ids == ["a"]
    assert (tmp_path / "shot.png").stat().st_size > 1000 and not seen.external_requests
