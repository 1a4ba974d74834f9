"""Use cases of the certificate authority: authorize → sign → record, over ports.

The code here knows the store only through ``store.base.Store`` and time only
through ``clock.Clock``; the server wires real adapters to it, tests wire
``meshtrust.testing.MemoryStore`` and ``FakeClock``.
"""
