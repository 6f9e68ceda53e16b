"""Trace-driven simulator of the control plane's autoscaling (see ``sim.simulator``)."""

# Here, not in sim.simulator (numpy, pydantic: ~170 ms to import), so that the CLI
# offers the names without importing the simulator.
POLICIES = ("tokenweir", "kpa", "keda-lag", "oracle", "foresight", "static-peak")
