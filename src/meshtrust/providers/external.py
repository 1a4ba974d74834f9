"""Opening an external CA by name, without importing its SDK until it is needed."""

from __future__ import annotations

from meshtrust import errors
from meshtrust.providers import base

EXTERNAL = ("aws-pca",)


def open_external(provider: str, arn: str) -> base.CAProvider:
    """The provider for CA ``arn`` at external CA ``provider``.

    The AWS SDK is imported here, on first use, so a server with local keys
    needs none of it; its region is the ARN's.
    """
    return open_service(provider, _region_of(arn)).provider(arn)


def open_service(provider: str, region: str) -> base.ExternalCA:
    """The external CA service ``provider`` in ``region``, to set CAs up with."""
    if provider != "aws-pca":
        raise errors.ConfigError(f"unknown CA provider {provider!r}; use one of "
                                 f"{', '.join(EXTERNAL)}")
    try:
        from meshtrust.providers import aws_pca
    except ImportError as exc:
        raise errors.ConfigError(
            "AWS Private CA needs the AWS SDK: pip install 'meshtrust[aws]'") from exc
    return aws_pca.AwsPca(region=region)


def _region_of(arn: str) -> str:
    parts = arn.split(":")
    if len(parts) < 6 or not parts[3]:
        raise errors.ConfigError(f"{arn!r} is not a CA ARN such as arn:aws:acm-pca:REGION:"
                                 "ACCOUNT:certificate-authority/ID")
    return parts[3]
