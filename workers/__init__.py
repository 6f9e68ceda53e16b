"""Workers: consume a model's shards, run an engine, reply, meter and beat."""


class WorkersError(Exception):
    """Root of the errors raised by :mod:`workers`."""


class EngineError(WorkersError):
    """An engine failed to serve one request (the request gets an error result)."""


class CalibrationError(WorkersError):
    """A calibration that cannot give a cost model (degenerate grid, unusable fit)."""


class ModelBuildError(WorkersError):
    """A model directory that cannot be built (``tokenweir model make-tiny``)."""
