"""Trace-driven simulator of the control plane's autoscaling (see ``sim.simulator``)."""
