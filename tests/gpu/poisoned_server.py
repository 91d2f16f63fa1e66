"""A GPU server whose device breaks for good on the request named "poison" (a test fixture).

Run as a separate process: a device-side assert leaves the CUDA context unusable
for the rest of the process, which must not be the test runner's.

    python tests/gpu/poisoned_server.py --port-file PORT_FILE
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path

import torch

from hingeloss_server.app import HingelossServer
from hingeloss_server.config import ServerConfig, WorkerConfig
from hingeloss_server.engine.jobs import LossJob


def poison(jobs: Sequence[LossJob]) -> None:
    """An out-of-bounds index on the device: a sticky "device-side assert"."""
    if any(job.request_id == "poison" for job in jobs):
        values = torch.zeros(4, device="cuda")
        values[torch.tensor([1 << 20], device="cuda")].sum().item()


async def main(port_file: Path) -> None:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        port_file=port_file,
        drain_seconds=1.0,
        workers=WorkerConfig(devices=("cuda:0",)),
    )
    server = HingelossServer(config, fault_hook=poison)
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port-file", type=Path, required=True)
    asyncio.run(main(parser.parse_args().port_file))
