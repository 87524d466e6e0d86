"""ha-exporter: keeps a fleet of master instances observable and available."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ha-exporter")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"
