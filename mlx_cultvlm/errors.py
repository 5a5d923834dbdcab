"""The one error type users see: a single line naming the file/field and what is wrong."""

import click


class CultvlmError(click.ClickException):
    """Raised for bad input or a missing prerequisite; the CLI prints it as one line, exit 1."""
