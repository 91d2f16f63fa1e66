"""Shared test helpers: server launchers, the worker gate, inputs and float64 references.

Imported as `helpers.<module>`: tests/conftest.py puts tests/ on sys.path.
"""
