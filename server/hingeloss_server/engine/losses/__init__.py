"""The losses: one module per loss with its closed-form kernel and its LossSpec.

binary.py (binary hinge), weston_watkins.py (multiclass_hinge), crammer_singer.py,
gan.py (discriminator and generator) and ranking.py (margin ranking); common.py
holds what the kernels share and spec.py the declaration. `SPECS` is the one
registry: validation, compute, answers, warm-up and the transport's codecs iterate
over it. The kernels are re-exported here for callers that run one directly
(`losses.crammer_singer` is the kernel; its module is imported by its full path).
"""

from __future__ import annotations

from hingeloss_server.engine.jobs import LossKind
from hingeloss_server.engine.losses import binary, gan, ranking, weston_watkins
from hingeloss_server.engine.losses import crammer_singer as crammer_singer_module
from hingeloss_server.engine.losses.common import Factors, LossOutput
from hingeloss_server.engine.losses.spec import LossSpec

SPECS: dict[LossKind, LossSpec] = {
    spec.kind: spec
    for spec in (
        binary.SPEC,
        weston_watkins.SPEC,
        crammer_singer_module.SPEC,
        gan.DISCRIMINATOR,
        gan.GENERATOR,
        ranking.SPEC,
    )
}
assert set(SPECS) == set(LossKind), "every loss needs a LossSpec"

binary_hinge = binary.binary_hinge
multiclass_hinge = weston_watkins.multiclass_hinge
class_factor = weston_watkins.class_factor
crammer_singer = crammer_singer_module.crammer_singer
gan_discriminator = gan.gan_discriminator
gan_generator = gan.gan_generator
margin_ranking = ranking.margin_ranking

__all__ = [
    "SPECS",
    "Factors",
    "LossOutput",
    "LossSpec",
    "binary_hinge",
    "class_factor",
    "crammer_singer",
    "gan_discriminator",
    "gan_generator",
    "margin_ranking",
    "multiclass_hinge",
]
