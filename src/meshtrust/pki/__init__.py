"""Pure X.509 for meshtrust: keys, CSRs, profiles, issuance, chains, rotation math.

Nothing in this package does I/O: functions take bytes and return bytes or
objects, and functions that depend on the time take ``now``.
"""
