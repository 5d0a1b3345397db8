"""Helpers of ``benchmarks/run.py``.

Kept import-light on purpose: the pytest plugins in this package are loaded
into the measured sessions (``-p nsbench.probe_plugin``), including the
pytest-forked reference venv, which has neither pytest-nsbox nor its
dependencies; ``rawfloor.py`` runs under ``python -I -S``, and so does the
sandbox factory of the "ns" row, which imports ``nsbench.ns_stub``.
"""
