"""Online half of Longhaul: the FastAPI server. Never imports ``exporters``."""

__version__ = "0.1.0"
