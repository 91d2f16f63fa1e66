"""Shared test helpers: server launchers, the worker gate, inputs and float64 references.

Imported as `helpers.<module>`: pytest puts tests/ on sys.path for tests/conftest.py (its
default "prepend" import mode); the scripts under tests/tools and tests/gpu add it themselves.
"""
