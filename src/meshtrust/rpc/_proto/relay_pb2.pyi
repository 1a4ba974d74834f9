from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BootstrapRequest(_message.Message):
    __slots__ = ("protocol_version", "cluster", "token", "csr")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    cluster: str
    token: str
    csr: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., cluster: _Optional[str] = ..., token: _Optional[str] = ..., csr: _Optional[bytes] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("protocol_version", "csr")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    csr: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., csr: _Optional[bytes] = ...) -> None: ...

class CertificateResponse(_message.Message):
    __slots__ = ("certificate_chain", "ca_bundle", "serial", "not_after_unix")
    CERTIFICATE_CHAIN_FIELD_NUMBER: _ClassVar[int]
    CA_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_UNIX_FIELD_NUMBER: _ClassVar[int]
    certificate_chain: bytes
    ca_bundle: bytes
    serial: str
    not_after_unix: int
    def __init__(self, certificate_chain: _Optional[bytes] = ..., ca_bundle: _Optional[bytes] = ..., serial: _Optional[str] = ..., not_after_unix: _Optional[int] = ...) -> None: ...

class HeldCertificate(_message.Message):
    __slots__ = ("kind", "namespace", "secret", "serial", "subject", "issuer", "not_before_unix", "not_after_unix", "renew_at_unix", "fingerprint_sha256", "managed")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_UNIX_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_UNIX_FIELD_NUMBER: _ClassVar[int]
    RENEW_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    MANAGED_FIELD_NUMBER: _ClassVar[int]
    kind: str
    namespace: str
    secret: str
    serial: str
    subject: str
    issuer: str
    not_before_unix: int
    not_after_unix: int
    renew_at_unix: int
    fingerprint_sha256: str
    managed: bool
    def __init__(self, kind: _Optional[str] = ..., namespace: _Optional[str] = ..., secret: _Optional[str] = ..., serial: _Optional[str] = ..., subject: _Optional[str] = ..., issuer: _Optional[str] = ..., not_before_unix: _Optional[int] = ..., not_after_unix: _Optional[int] = ..., renew_at_unix: _Optional[int] = ..., fingerprint_sha256: _Optional[str] = ..., managed: _Optional[bool] = ...) -> None: ...

class StatusReport(_message.Message):
    __slots__ = ("protocol_version", "agent_version", "replica", "leader", "certificates")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    agent_version: str
    replica: str
    leader: bool
    certificates: _containers.RepeatedCompositeFieldContainer[HeldCertificate]
    def __init__(self, protocol_version: _Optional[int] = ..., agent_version: _Optional[str] = ..., replica: _Optional[str] = ..., leader: _Optional[bool] = ..., certificates: _Optional[_Iterable[_Union[HeldCertificate, _Mapping]]] = ...) -> None: ...

class StatusAck(_message.Message):
    __slots__ = ("server_time_unix",)
    SERVER_TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    server_time_unix: int
    def __init__(self, server_time_unix: _Optional[int] = ...) -> None: ...

class WorkSubscribe(_message.Message):
    __slots__ = ("protocol_version", "replica", "leader", "status")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    replica: str
    leader: bool
    status: StatusReport
    def __init__(self, protocol_version: _Optional[int] = ..., replica: _Optional[str] = ..., leader: _Optional[bool] = ..., status: _Optional[_Union[StatusReport, _Mapping]] = ...) -> None: ...

class WorkItem(_message.Message):
    __slots__ = ("id", "heartbeat", "issue_intermediate")
    ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    ISSUE_INTERMEDIATE_FIELD_NUMBER: _ClassVar[int]
    id: str
    heartbeat: Heartbeat
    issue_intermediate: IssueIntermediate
    def __init__(self, id: _Optional[str] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., issue_intermediate: _Optional[_Union[IssueIntermediate, _Mapping]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("server_time_unix", "renew_client", "status_recorded")
    SERVER_TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    RENEW_CLIENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_RECORDED_FIELD_NUMBER: _ClassVar[int]
    server_time_unix: int
    renew_client: bool
    status_recorded: bool
    def __init__(self, server_time_unix: _Optional[int] = ..., renew_client: _Optional[bool] = ..., status_recorded: _Optional[bool] = ...) -> None: ...

class IssueIntermediate(_message.Message):
    __slots__ = ("policy", "key_type", "trust_domain", "org", "generation", "form", "auto_restart_pods")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    KEY_TYPE_FIELD_NUMBER: _ClassVar[int]
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    ORG_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    FORM_FIELD_NUMBER: _ClassVar[int]
    AUTO_RESTART_PODS_FIELD_NUMBER: _ClassVar[int]
    policy: str
    key_type: str
    trust_domain: str
    org: str
    generation: int
    form: str
    auto_restart_pods: bool
    def __init__(self, policy: _Optional[str] = ..., key_type: _Optional[str] = ..., trust_domain: _Optional[str] = ..., org: _Optional[str] = ..., generation: _Optional[int] = ..., form: _Optional[str] = ..., auto_restart_pods: _Optional[bool] = ...) -> None: ...

class WorkResult(_message.Message):
    __slots__ = ("id", "csr", "error", "stage", "pods_bounced", "restart_needed")
    ID_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PODS_BOUNCED_FIELD_NUMBER: _ClassVar[int]
    RESTART_NEEDED_FIELD_NUMBER: _ClassVar[int]
    id: str
    csr: bytes
    error: str
    stage: str
    pods_bounced: _containers.RepeatedScalarFieldContainer[str]
    restart_needed: bool
    def __init__(self, id: _Optional[str] = ..., csr: _Optional[bytes] = ..., error: _Optional[str] = ..., stage: _Optional[str] = ..., pods_bounced: _Optional[_Iterable[str]] = ..., restart_needed: _Optional[bool] = ...) -> None: ...

class WorkAck(_message.Message):
    __slots__ = ("certificate_chain", "root_bundle", "error")
    CERTIFICATE_CHAIN_FIELD_NUMBER: _ClassVar[int]
    ROOT_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    certificate_chain: bytes
    root_bundle: bytes
    error: str
    def __init__(self, certificate_chain: _Optional[bytes] = ..., root_bundle: _Optional[bytes] = ..., error: _Optional[str] = ...) -> None: ...
