"""Kafka plumbing: topic registry, codecs, producers, consumers and the client library."""


class StreamsError(Exception):
    """Root of the errors raised by :mod:`streams`."""


class DecodeError(StreamsError):
    """A record that is not a valid event; ``reason`` says why (for dead letters)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RequestTimeout(StreamsError):
    """No reply arrived on the reply topic in time."""
