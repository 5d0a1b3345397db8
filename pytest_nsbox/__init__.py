"""pytest-nsbox: run pytest tests in throw-away Linux sandboxes."""

__version__ = "0.1.0"
