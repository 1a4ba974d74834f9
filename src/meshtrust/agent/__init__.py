"""The agent process of a workload cluster: identity, provider, watcher, rotator."""
