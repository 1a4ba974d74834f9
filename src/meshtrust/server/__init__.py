"""The management server process: relay listeners, the CA, the policy loops."""
