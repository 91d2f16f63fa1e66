"""hingeloss-bench: the load-testing client (closed and open loop, verified answers).

The load loop needs only the SDK's own dependencies; live progress, tables and
the plot need the `loadtest` extra (`pip install "hingeloss[loadtest]"`).
"""

from hingeloss_bench.cells import CellSpec, ShareResult, TargetSpec
from hingeloss_bench.loadgen import run_share
from hingeloss_bench.processes import run_shares
from hingeloss_bench.stats import CellResult, merge
from hingeloss_bench.workload import Workload, WorkloadSpec, parse_shape

__all__ = [
    "CellResult",
    "CellSpec",
    "ShareResult",
    "TargetSpec",
    "Workload",
    "WorkloadSpec",
    "merge",
    "parse_shape",
    "run_share",
    "run_shares",
]
