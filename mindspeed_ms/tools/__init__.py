"""Command-line tools (run with ``python -m mindspeed_ms.tools.<name>``)."""
