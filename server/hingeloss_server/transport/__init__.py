"""The gRPC side: the servicer, the request and response codecs, the status table, auth.

It turns wire messages into engine jobs and engine results into wire messages; no loss
math lives here.
"""
