"""The simulated fleet: a master speaking the whole protocol, and the embedded demo."""

from exporter.sim.master import create_app, serve_master
from exporter.sim.state import SimulatedMaster, snapshot_checksum

__all__ = ["SimulatedMaster", "create_app", "serve_master", "snapshot_checksum"]
