"""The relay's wire: protobuf messages, gRPC transport, and error ↔ status mapping.

``meshtrust.rpc`` is the only package that imports ``grpc``; the server and
the agent reach gRPC through ``rpc.transport``.
"""

PROTOCOL_VERSION = 1
