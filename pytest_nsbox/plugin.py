"""The pytest hooks of pytest-nsbox (being built)."""
