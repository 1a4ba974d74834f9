"""meshtrust: certificate management for multi-cluster service meshes.

The management server is the certificate authority for a fleet of workload
clusters; an agent in each cluster talks to it over an mTLS gRPC relay. See
``docs/architecture.md`` for the layers and the flows.
"""

__version__ = "0.1.0"
