"""Exceptions that carry a message meant for the user."""

from __future__ import annotations


class BaylingError(Exception):
    """A failure the user can act on; CLIs print it as one line and exit 1."""


class InvalidInput(BaylingError):
    """A request field is wrong. ``field`` names it, so servers and clients can say which."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message
