"""cvserve's Python client (`cvserve.client`) and command line (`cvserve`, `cvserve.cli`)."""

from cvserve.client import (
    AnnotatedAnswer,
    AsyncClient,
    Client,
    CvserveError,
    GatewayError,
    GatewayUnreachable,
    RetryPolicy,
)

__all__ = [
    "AnnotatedAnswer",
    "AsyncClient",
    "Client",
    "CvserveError",
    "GatewayError",
    "GatewayUnreachable",
    "RetryPolicy",
]
