# trustmesh: generated from proto/trustmesh/v1/types.proto by scripts/gen-proto; do not edit.
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PolicyMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_MODE_UNSPECIFIED: _ClassVar[PolicyMode]
    POLICY_MODE_ENFORCE: _ClassVar[PolicyMode]
    POLICY_MODE_AUDIT: _ClassVar[PolicyMode]

class AgentStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_STATUS_UNSPECIFIED: _ClassVar[AgentStatus]
    AGENT_STATUS_ACTIVE: _ClassVar[AgentStatus]
    AGENT_STATUS_SUSPECTED_CLONE: _ClassVar[AgentStatus]
POLICY_MODE_UNSPECIFIED: PolicyMode
POLICY_MODE_ENFORCE: PolicyMode
POLICY_MODE_AUDIT: PolicyMode
AGENT_STATUS_UNSPECIFIED: AgentStatus
AGENT_STATUS_ACTIVE: AgentStatus
AGENT_STATUS_SUSPECTED_CLONE: AgentStatus

class Selector(_message.Message):
    __slots__ = ("type", "value")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    type: str
    value: str
    def __init__(self, type: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("id", "spiffe_id", "parent_id", "selectors", "x509_ttl_seconds", "jwt_ttl_seconds", "dns_names", "federates_with", "admin", "revision", "hint", "created_at", "updated_at", "node_selector")
    class NodeSelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    X509_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    JWT_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DNS_NAMES_FIELD_NUMBER: _ClassVar[int]
    FEDERATES_WITH_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    NODE_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    id: str
    spiffe_id: str
    parent_id: str
    selectors: _containers.RepeatedCompositeFieldContainer[Selector]
    x509_ttl_seconds: int
    jwt_ttl_seconds: int
    dns_names: _containers.RepeatedScalarFieldContainer[str]
    federates_with: _containers.RepeatedScalarFieldContainer[str]
    admin: bool
    revision: int
    hint: str
    created_at: int
    updated_at: int
    node_selector: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., parent_id: _Optional[str] = ..., selectors: _Optional[_Iterable[_Union[Selector, _Mapping]]] = ..., x509_ttl_seconds: _Optional[int] = ..., jwt_ttl_seconds: _Optional[int] = ..., dns_names: _Optional[_Iterable[str]] = ..., federates_with: _Optional[_Iterable[str]] = ..., admin: _Optional[bool] = ..., revision: _Optional[int] = ..., hint: _Optional[str] = ..., created_at: _Optional[int] = ..., updated_at: _Optional[int] = ..., node_selector: _Optional[_Mapping[str, str]] = ...) -> None: ...

class JwtAuthority(_message.Message):
    __slots__ = ("key_id", "public_key", "expires_at")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    public_key: bytes
    expires_at: int
    def __init__(self, key_id: _Optional[str] = ..., public_key: _Optional[bytes] = ..., expires_at: _Optional[int] = ...) -> None: ...

class Bundle(_message.Message):
    __slots__ = ("trust_domain", "x509_authorities", "jwt_authorities", "refresh_hint_seconds", "sequence_number")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    X509_AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    JWT_AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    REFRESH_HINT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    x509_authorities: _containers.RepeatedScalarFieldContainer[bytes]
    jwt_authorities: _containers.RepeatedCompositeFieldContainer[JwtAuthority]
    refresh_hint_seconds: int
    sequence_number: int
    def __init__(self, trust_domain: _Optional[str] = ..., x509_authorities: _Optional[_Iterable[bytes]] = ..., jwt_authorities: _Optional[_Iterable[_Union[JwtAuthority, _Mapping]]] = ..., refresh_hint_seconds: _Optional[int] = ..., sequence_number: _Optional[int] = ...) -> None: ...

class AllowedSource(_message.Message):
    __slots__ = ("id", "is_prefix", "expires_at", "methods", "paths", "windows")
    ID_FIELD_NUMBER: _ClassVar[int]
    IS_PREFIX_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    id: str
    is_prefix: bool
    expires_at: int
    methods: _containers.RepeatedScalarFieldContainer[str]
    paths: _containers.RepeatedScalarFieldContainer[str]
    windows: _containers.RepeatedCompositeFieldContainer[TimeWindow]
    def __init__(self, id: _Optional[str] = ..., is_prefix: _Optional[bool] = ..., expires_at: _Optional[int] = ..., methods: _Optional[_Iterable[str]] = ..., paths: _Optional[_Iterable[str]] = ..., windows: _Optional[_Iterable[_Union[TimeWindow, _Mapping]]] = ...) -> None: ...

class TimeWindow(_message.Message):
    __slots__ = ("days", "start_minute", "end_minute", "timezone")
    DAYS_FIELD_NUMBER: _ClassVar[int]
    START_MINUTE_FIELD_NUMBER: _ClassVar[int]
    END_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    days: int
    start_minute: int
    end_minute: int
    timezone: str
    def __init__(self, days: _Optional[int] = ..., start_minute: _Optional[int] = ..., end_minute: _Optional[int] = ..., timezone: _Optional[str] = ...) -> None: ...

class PolicyRule(_message.Message):
    __slots__ = ("destination", "destination_is_prefix", "ports", "mode", "allow", "allowlist", "owner", "rule_index")
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_IS_PREFIX_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FIELD_NUMBER: _ClassVar[int]
    ALLOWLIST_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    RULE_INDEX_FIELD_NUMBER: _ClassVar[int]
    destination: str
    destination_is_prefix: bool
    ports: _containers.RepeatedScalarFieldContainer[int]
    mode: PolicyMode
    allow: _containers.RepeatedCompositeFieldContainer[AllowedSource]
    allowlist: str
    owner: str
    rule_index: int
    def __init__(self, destination: _Optional[str] = ..., destination_is_prefix: _Optional[bool] = ..., ports: _Optional[_Iterable[int]] = ..., mode: _Optional[_Union[PolicyMode, str]] = ..., allow: _Optional[_Iterable[_Union[AllowedSource, _Mapping]]] = ..., allowlist: _Optional[str] = ..., owner: _Optional[str] = ..., rule_index: _Optional[int] = ...) -> None: ...

class CompiledPolicy(_message.Message):
    __slots__ = ("revision", "rules", "revoked_serials", "quarantined")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    REVOKED_SERIALS_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    revision: int
    rules: _containers.RepeatedCompositeFieldContainer[PolicyRule]
    revoked_serials: _containers.RepeatedScalarFieldContainer[str]
    quarantined: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, revision: _Optional[int] = ..., rules: _Optional[_Iterable[_Union[PolicyRule, _Mapping]]] = ..., revoked_serials: _Optional[_Iterable[str]] = ..., quarantined: _Optional[_Iterable[str]] = ...) -> None: ...

class AttestedNode(_message.Message):
    __slots__ = ("spiffe_id", "node_name", "attestation_type", "cert_serial", "cert_not_after", "banned", "created_at", "updated_at", "selectors", "revision", "status", "status_reason", "status_changed_at", "renewed_from", "permissive_listeners", "connected", "policy_revision", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_TYPE_FIELD_NUMBER: _ClassVar[int]
    CERT_SERIAL_FIELD_NUMBER: _ClassVar[int]
    CERT_NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    BANNED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_REASON_FIELD_NUMBER: _ClassVar[int]
    STATUS_CHANGED_AT_FIELD_NUMBER: _ClassVar[int]
    RENEWED_FROM_FIELD_NUMBER: _ClassVar[int]
    PERMISSIVE_LISTENERS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    POLICY_REVISION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    node_name: str
    attestation_type: str
    cert_serial: str
    cert_not_after: int
    banned: bool
    created_at: int
    updated_at: int
    selectors: _containers.RepeatedCompositeFieldContainer[Selector]
    revision: int
    status: AgentStatus
    status_reason: str
    status_changed_at: int
    renewed_from: str
    permissive_listeners: _containers.RepeatedScalarFieldContainer[str]
    connected: bool
    policy_revision: int
    labels: _containers.ScalarMap[str, str]
    def __init__(self, spiffe_id: _Optional[str] = ..., node_name: _Optional[str] = ..., attestation_type: _Optional[str] = ..., cert_serial: _Optional[str] = ..., cert_not_after: _Optional[int] = ..., banned: _Optional[bool] = ..., created_at: _Optional[int] = ..., updated_at: _Optional[int] = ..., selectors: _Optional[_Iterable[_Union[Selector, _Mapping]]] = ..., revision: _Optional[int] = ..., status: _Optional[_Union[AgentStatus, str]] = ..., status_reason: _Optional[str] = ..., status_changed_at: _Optional[int] = ..., renewed_from: _Optional[str] = ..., permissive_listeners: _Optional[_Iterable[str]] = ..., connected: _Optional[bool] = ..., policy_revision: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("seq", "time", "kind", "actor", "subject", "outcome", "details_json", "prev_hash", "hash")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time: int
    kind: str
    actor: str
    subject: str
    outcome: str
    details_json: str
    prev_hash: str
    hash: str
    def __init__(self, seq: _Optional[int] = ..., time: _Optional[int] = ..., kind: _Optional[str] = ..., actor: _Optional[str] = ..., subject: _Optional[str] = ..., outcome: _Optional[str] = ..., details_json: _Optional[str] = ..., prev_hash: _Optional[str] = ..., hash: _Optional[str] = ...) -> None: ...
