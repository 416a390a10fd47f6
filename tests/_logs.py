"""A logging handler that keeps the messages it sees, for tests that assert on log lines."""

import logging


class LogLines(logging.Handler):
    """Collects ``record.getMessage()`` of every record at ``level`` or above in ``lines``."""

    def __init__(self, level: int = logging.INFO):
        super().__init__(level)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())
