"""Thin typer apps (`embed`, `heads`) over the embedstore and heads packages."""
