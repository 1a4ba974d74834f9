"""Certificate authorities meshtrust signs through: local keys, a CA the user brings, AWS
Private CA. Each sits behind the small ``CAProvider`` port of ``providers.base``."""
