class SchemaError(Exception):
    """Root of the errors raised by :mod:`schemas`."""


class ConfigError(SchemaError):
    """Configuration that cannot be used as given."""
