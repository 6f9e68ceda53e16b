"""Actuators: consume ScaleDecisions on ``tw.scale`` and make the replica count so."""
