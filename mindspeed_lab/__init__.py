"""mindspeed_lab: notebook helpers to configure, launch and watch mindspeed_ms training runs."""

__version__ = "0.1.0"
