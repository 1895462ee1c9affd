"""resin-migrate builder: turns an intel-nuc resinOS flasher image into a migration bundle."""

from runtime import __version__

__all__ = ["__version__"]
