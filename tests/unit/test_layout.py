"""The engine knows no gRPC: it imports neither `grpc` nor the generated `hingeloss.v1`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Imports every engine module with grpc and hingeloss.v1 made unimportable, so that the
# first import of either, however indirect, fails with the chain that led to it.
_IMPORT_THE_ENGINE = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    FORBIDDEN = ("grpc", "hingeloss.v1")

    class Forbid(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                raise ImportError(f"the engine imported {name}")
            return None

    sys.meta_path.insert(0, Forbid())
    import hingeloss_server.engine as engine

    names = [m.name for m in pkgutil.walk_packages(engine.__path__, "hingeloss_server.engine.")]
    for name in names:
        importlib.import_module(name)
    print(len(names))
    """
)


def test_the_engine_imports_neither_grpc_nor_the_wire_messages() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_THE_ENGINE],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) >= 10  # every module was imported, not none
