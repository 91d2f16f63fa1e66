"""Small requests of every loss, run once on each worker before the server says SERVING."""

from __future__ import annotations

import numpy as np

from hingeloss import tensors
from hingeloss.v1 import loss_service_pb2 as pb


def warm_up_requests() -> list[pb.ComputeRequest]:
    """One small request per loss, float32 and float64, to warm every kernel up."""
    requests = []
    for dtype in ("float32", "float64"):
        scores = np.linspace(-2, 2, 8, dtype=dtype)
        labels = np.array([1, -1] * 4, dtype="int64")
        matrix = np.linspace(-2, 2, 24, dtype=dtype).reshape(8, 3)
        targets = np.arange(8, dtype="int64") % 3
        enc = tensors.from_numpy
        requests += [
            pb.ComputeRequest(binary_hinge=pb.BinaryHinge(scores=enc(scores), labels=enc(labels))),
            pb.ComputeRequest(
                multiclass_hinge=pb.MulticlassHinge(scores=enc(matrix), targets=enc(targets))
            ),
            pb.ComputeRequest(
                crammer_singer=pb.CrammerSinger(scores=enc(matrix), targets=enc(targets))
            ),
            pb.ComputeRequest(
                gan_discriminator=pb.GanDiscriminator(
                    real_scores=enc(scores), fake_scores=enc(scores[:5])
                )
            ),
            pb.ComputeRequest(gan_generator=pb.GanGenerator(fake_scores=enc(scores))),
            pb.ComputeRequest(
                margin_ranking=pb.MarginRanking(
                    scores_a=enc(scores), scores_b=enc(scores[::-1].copy()), labels=enc(labels)
                ),
                gradient_format=pb.GRADIENT_FORMAT_ROW_SPARSE,
            ),
        ]
    return requests
