"""The loss engine: jobs, the batch queue, device workers, validation and the kernels.

It knows nothing of gRPC or the wire format (tests/unit/test_layout.py checks that it imports
neither `grpc` nor `hingeloss.v1`): the transport decodes requests into `jobs.LossJob`s
and encodes the `jobs.JobResult` each one is answered with.
"""
