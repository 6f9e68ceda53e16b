"""Running the stack: Kafka, ClickHouse, provisioning, processes and the CLI."""


class InfraError(Exception):
    """Root of the errors raised by :mod:`infra`; messages are meant for operators."""
