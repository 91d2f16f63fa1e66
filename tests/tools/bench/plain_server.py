"""The plain floor: the server a user would write in an afternoon, for `make bench`.

grpc.aio, the generated servicer, and torch in the handler: each request is decoded,
its Weston-Watkins loss (the benchmark's workload) and gradient computed in closed
form with a few torch ops on the event loop (as a user who knows the hinge's gradient
writes it; autograd through `F.multi_margin_loss` is several times slower on the CPU,
see the compute floor), and answered. No batching, no validation, no metrics, no
limits. A batching service has to beat this.

`python tests/tools/bench/plain_server.py --port-file F` serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc
import torch
from echo_server import add_health, serve_until_signalled

from hingeloss import _tensors as tensors
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc


class Plain(pb_grpc.LossServiceServicer):
    async def Compute(  # noqa: N802 - gRPC method name
        self, request: pb.ComputeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ComputeResponse:
        message = request.multiclass_hinge
        scores = torch.from_numpy(tensors.to_numpy(message.scores)).float()
        target = torch.from_numpy(tensors.to_numpy(message.targets)).long().unsqueeze(1)
        rows = scores.shape[0]
        # Weston-Watkins, summed over classes, mean over rows, in closed form.
        z = scores - scores.gather(1, target) + 1.0
        z.scatter_(1, target, 0.0)
        loss = z.clamp_min(0.0).sum() / rows
        grad = (z > 0).float().div_(rows)
        grad.scatter_(1, target, -grad.sum(1, keepdim=True))
        return pb.ComputeResponse(
            request_id=request.request_id,
            loss=float(loss),
            gradients=[pb.Gradient(input="scores", dense=tensors.from_numpy(grad.numpy()))],
        )


async def serve(port_file: Path) -> None:
    options = [("grpc.max_receive_message_length", 1 << 30), ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=[*options, ("grpc.max_send_message_length", 1 << 30)])
    pb_grpc.add_LossServiceServicer_to_server(Plain(), server)  # type: ignore[no-untyped-call]
    await add_health(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await serve_until_signalled(server, port, port_file)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The plain floor: torch in a grpc.aio handler.")
    parser.add_argument("--port-file", type=Path, required=True)
    asyncio.run(serve(parser.parse_args().port_file))
