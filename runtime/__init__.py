"""resin-migrate runtime: the device side of the migration (standard library only, Python 3.4+)."""

__version__ = "0.1.0"
