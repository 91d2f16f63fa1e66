"""The plain floor: the server a user would write in an afternoon, for `make bench`.

grpc.aio, the generated servicer, and torch in the handler: each request is decoded,
its Weston-Watkins loss (the benchmark's workload) and gradient computed with
`F.multi_margin_loss` and autograd on the event loop, and answered. No batching, no
validation, no metrics, no limits. A batching service has to beat this.

`python tests/bench/plain_server.py --port-file F` serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import grpc
import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from hingeloss import tensors
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc


class Plain(pb_grpc.LossServiceServicer):
    async def Compute(  # noqa: N802 - gRPC method name
        self, request: pb.ComputeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ComputeResponse:
        message = request.multiclass_hinge
        scores = torch.from_numpy(tensors.to_numpy(message.scores)).float().requires_grad_()
        targets = torch.from_numpy(tensors.to_numpy(message.targets)).long()
        # torch divides each sample's sum by C; the service's default is the textbook sum.
        loss = F.multi_margin_loss(scores, targets) * scores.shape[1]
        loss.backward()
        assert scores.grad is not None
        return pb.ComputeResponse(
            request_id=request.request_id,
            loss=float(loss),
            gradients=[pb.Gradient(input="scores", dense=tensors.from_numpy(scores.grad.numpy()))],
        )


async def serve(port_file: Path) -> None:
    options = [("grpc.max_receive_message_length", 1 << 30), ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=[*options, ("grpc.max_send_message_length", 1 << 30)])
    pb_grpc.add_LossServiceServicer_to_server(Plain(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop(0)))
    tmp = port_file.with_name(port_file.name + ".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(port_file)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The plain floor: torch in a grpc.aio handler.")
    parser.add_argument("--port-file", type=Path, required=True)
    asyncio.run(serve(parser.parse_args().port_file))
