"""Faust agents: thin shells that apply decisions made by pure classes."""


class AgentsError(Exception):
    """Root of the errors raised by :mod:`agents`."""
