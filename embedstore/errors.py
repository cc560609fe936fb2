"""Errors a user can cause. The CLI prints their message (no traceback) and exits non-zero."""


class UserError(Exception):
    """Bad input: the message says what is wrong, where, and how to fix it."""

    exit_code = 2


class SlideError(UserError):
    """A slide cannot be opened or read, or has no usable µm/px."""


class CellsError(UserError):
    """A cell table or Xenium bundle is malformed."""


class AlignmentError(CellsError):
    """A Xenium H&E alignment matrix is not usable."""
