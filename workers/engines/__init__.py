"""Engines behind one async interface; see :class:`workers.engines.base.Engine`."""
