# trustmesh: generated from proto/trustmesh/v1/admin.proto by scripts/gen-proto; do not edit.
from trustmesh._proto.trustmesh.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BundleEndpointProfile(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUNDLE_ENDPOINT_PROFILE_UNSPECIFIED: _ClassVar[BundleEndpointProfile]
    BUNDLE_ENDPOINT_PROFILE_HTTPS_WEB: _ClassVar[BundleEndpointProfile]
    BUNDLE_ENDPOINT_PROFILE_HTTPS_SPIFFE: _ClassVar[BundleEndpointProfile]

class CAAuthorityKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CA_AUTHORITY_KIND_UNSPECIFIED: _ClassVar[CAAuthorityKind]
    CA_AUTHORITY_KIND_X509_ROOT: _ClassVar[CAAuthorityKind]
    CA_AUTHORITY_KIND_X509_SIGNING: _ClassVar[CAAuthorityKind]
    CA_AUTHORITY_KIND_JWT_KEY: _ClassVar[CAAuthorityKind]

class CAAuthorityState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CA_AUTHORITY_STATE_UNSPECIFIED: _ClassVar[CAAuthorityState]
    CA_AUTHORITY_STATE_PREPARED: _ClassVar[CAAuthorityState]
    CA_AUTHORITY_STATE_ACTIVE: _ClassVar[CAAuthorityState]
    CA_AUTHORITY_STATE_OLD: _ClassVar[CAAuthorityState]

class RootRotationStep(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROOT_ROTATION_STEP_UNSPECIFIED: _ClassVar[RootRotationStep]
    ROOT_ROTATION_STEP_PREPARE: _ClassVar[RootRotationStep]
    ROOT_ROTATION_STEP_ACTIVATE: _ClassVar[RootRotationStep]
    ROOT_ROTATION_STEP_RETIRE: _ClassVar[RootRotationStep]
BUNDLE_ENDPOINT_PROFILE_UNSPECIFIED: BundleEndpointProfile
BUNDLE_ENDPOINT_PROFILE_HTTPS_WEB: BundleEndpointProfile
BUNDLE_ENDPOINT_PROFILE_HTTPS_SPIFFE: BundleEndpointProfile
CA_AUTHORITY_KIND_UNSPECIFIED: CAAuthorityKind
CA_AUTHORITY_KIND_X509_ROOT: CAAuthorityKind
CA_AUTHORITY_KIND_X509_SIGNING: CAAuthorityKind
CA_AUTHORITY_KIND_JWT_KEY: CAAuthorityKind
CA_AUTHORITY_STATE_UNSPECIFIED: CAAuthorityState
CA_AUTHORITY_STATE_PREPARED: CAAuthorityState
CA_AUTHORITY_STATE_ACTIVE: CAAuthorityState
CA_AUTHORITY_STATE_OLD: CAAuthorityState
ROOT_ROTATION_STEP_UNSPECIFIED: RootRotationStep
ROOT_ROTATION_STEP_PREPARE: RootRotationStep
ROOT_ROTATION_STEP_ACTIVATE: RootRotationStep
ROOT_ROTATION_STEP_RETIRE: RootRotationStep

class CreateEntryRequest(_message.Message):
    __slots__ = ("entry",)
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    entry: _types_pb2.Entry
    def __init__(self, entry: _Optional[_Union[_types_pb2.Entry, _Mapping]] = ...) -> None: ...

class CreateEntryResponse(_message.Message):
    __slots__ = ("entry",)
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    entry: _types_pb2.Entry
    def __init__(self, entry: _Optional[_Union[_types_pb2.Entry, _Mapping]] = ...) -> None: ...

class GetEntryRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetEntryResponse(_message.Message):
    __slots__ = ("entry",)
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    entry: _types_pb2.Entry
    def __init__(self, entry: _Optional[_Union[_types_pb2.Entry, _Mapping]] = ...) -> None: ...

class ListEntriesRequest(_message.Message):
    __slots__ = ("parent_id", "spiffe_id", "page_size", "page_token")
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parent_id: str
    spiffe_id: str
    page_size: int
    page_token: str
    def __init__(self, parent_id: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListEntriesResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[_types_pb2.Entry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[_types_pb2.Entry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateEntryRequest(_message.Message):
    __slots__ = ("entry", "expected_revision")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    entry: _types_pb2.Entry
    expected_revision: int
    def __init__(self, entry: _Optional[_Union[_types_pb2.Entry, _Mapping]] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class UpdateEntryResponse(_message.Message):
    __slots__ = ("entry",)
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    entry: _types_pb2.Entry
    def __init__(self, entry: _Optional[_Union[_types_pb2.Entry, _Mapping]] = ...) -> None: ...

class DeleteEntryRequest(_message.Message):
    __slots__ = ("id", "expected_revision")
    ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    id: str
    expected_revision: int
    def __init__(self, id: _Optional[str] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class DeleteEntryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CreateJoinTokenRequest(_message.Message):
    __slots__ = ("node_name", "ttl_seconds")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    ttl_seconds: int
    def __init__(self, node_name: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class CreateJoinTokenResponse(_message.Message):
    __slots__ = ("token", "expires_at", "agent_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_at: int
    agent_id: str
    def __init__(self, token: _Optional[str] = ..., expires_at: _Optional[int] = ..., agent_id: _Optional[str] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[_types_pb2.AttestedNode]
    def __init__(self, agents: _Optional[_Iterable[_Union[_types_pb2.AttestedNode, _Mapping]]] = ...) -> None: ...

class BanAgentRequest(_message.Message):
    __slots__ = ("spiffe_id",)
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    def __init__(self, spiffe_id: _Optional[str] = ...) -> None: ...

class BanAgentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EvictAgentRequest(_message.Message):
    __slots__ = ("spiffe_id",)
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    def __init__(self, spiffe_id: _Optional[str] = ...) -> None: ...

class EvictAgentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClearAgentRequest(_message.Message):
    __slots__ = ("spiffe_id",)
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    def __init__(self, spiffe_id: _Optional[str] = ...) -> None: ...

class ClearAgentResponse(_message.Message):
    __slots__ = ("agent", "cleared")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    agent: _types_pb2.AttestedNode
    cleared: bool
    def __init__(self, agent: _Optional[_Union[_types_pb2.AttestedNode, _Mapping]] = ..., cleared: _Optional[bool] = ...) -> None: ...

class LabelAgentRequest(_message.Message):
    __slots__ = ("spiffe_id", "set", "remove")
    class SetEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    SET_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    set: _containers.ScalarMap[str, str]
    remove: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, spiffe_id: _Optional[str] = ..., set: _Optional[_Mapping[str, str]] = ..., remove: _Optional[_Iterable[str]] = ...) -> None: ...

class LabelAgentResponse(_message.Message):
    __slots__ = ("agent", "changed")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    agent: _types_pb2.AttestedNode
    changed: bool
    def __init__(self, agent: _Optional[_Union[_types_pb2.AttestedNode, _Mapping]] = ..., changed: _Optional[bool] = ...) -> None: ...

class GetBundleRequest(_message.Message):
    __slots__ = ("trust_domain",)
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    def __init__(self, trust_domain: _Optional[str] = ...) -> None: ...

class GetBundleResponse(_message.Message):
    __slots__ = ("bundle", "spiffe_bundle")
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    bundle: _types_pb2.Bundle
    spiffe_bundle: bytes
    def __init__(self, bundle: _Optional[_Union[_types_pb2.Bundle, _Mapping]] = ..., spiffe_bundle: _Optional[bytes] = ...) -> None: ...

class FederationRelationship(_message.Message):
    __slots__ = ("trust_domain", "bundle_endpoint_url", "profile", "endpoint_spiffe_id", "bundle_sequence_number", "last_refreshed_at", "last_error")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ENDPOINT_URL_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SEQUENCE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    LAST_REFRESHED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    bundle_endpoint_url: str
    profile: BundleEndpointProfile
    endpoint_spiffe_id: str
    bundle_sequence_number: int
    last_refreshed_at: int
    last_error: str
    def __init__(self, trust_domain: _Optional[str] = ..., bundle_endpoint_url: _Optional[str] = ..., profile: _Optional[_Union[BundleEndpointProfile, str]] = ..., endpoint_spiffe_id: _Optional[str] = ..., bundle_sequence_number: _Optional[int] = ..., last_refreshed_at: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...

class ListFederationRelationshipsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListFederationRelationshipsResponse(_message.Message):
    __slots__ = ("relationships",)
    RELATIONSHIPS_FIELD_NUMBER: _ClassVar[int]
    relationships: _containers.RepeatedCompositeFieldContainer[FederationRelationship]
    def __init__(self, relationships: _Optional[_Iterable[_Union[FederationRelationship, _Mapping]]] = ...) -> None: ...

class CreateFederationRelationshipRequest(_message.Message):
    __slots__ = ("trust_domain", "bundle_endpoint_url", "profile", "endpoint_spiffe_id", "bundle")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ENDPOINT_URL_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    bundle_endpoint_url: str
    profile: BundleEndpointProfile
    endpoint_spiffe_id: str
    bundle: bytes
    def __init__(self, trust_domain: _Optional[str] = ..., bundle_endpoint_url: _Optional[str] = ..., profile: _Optional[_Union[BundleEndpointProfile, str]] = ..., endpoint_spiffe_id: _Optional[str] = ..., bundle: _Optional[bytes] = ...) -> None: ...

class CreateFederationRelationshipResponse(_message.Message):
    __slots__ = ("relationship",)
    RELATIONSHIP_FIELD_NUMBER: _ClassVar[int]
    relationship: FederationRelationship
    def __init__(self, relationship: _Optional[_Union[FederationRelationship, _Mapping]] = ...) -> None: ...

class DeleteFederationRelationshipRequest(_message.Message):
    __slots__ = ("trust_domain",)
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    def __init__(self, trust_domain: _Optional[str] = ...) -> None: ...

class DeleteFederationRelationshipResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RefreshFederatedBundleRequest(_message.Message):
    __slots__ = ("trust_domain",)
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    def __init__(self, trust_domain: _Optional[str] = ...) -> None: ...

class RefreshFederatedBundleResponse(_message.Message):
    __slots__ = ("bundle",)
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    bundle: _types_pb2.Bundle
    def __init__(self, bundle: _Optional[_Union[_types_pb2.Bundle, _Mapping]] = ...) -> None: ...

class PolicyRevision(_message.Message):
    __slots__ = ("revision", "documents", "author", "comment", "created_at", "sha256")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    revision: int
    documents: str
    author: str
    comment: str
    created_at: int
    sha256: str
    def __init__(self, revision: _Optional[int] = ..., documents: _Optional[str] = ..., author: _Optional[str] = ..., comment: _Optional[str] = ..., created_at: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ApplyPolicyRequest(_message.Message):
    __slots__ = ("documents", "author", "comment", "expected_head_revision", "dry_run", "team", "allow_empty")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_HEAD_REVISION_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    ALLOW_EMPTY_FIELD_NUMBER: _ClassVar[int]
    documents: str
    author: str
    comment: str
    expected_head_revision: int
    dry_run: bool
    team: str
    allow_empty: bool
    def __init__(self, documents: _Optional[str] = ..., author: _Optional[str] = ..., comment: _Optional[str] = ..., expected_head_revision: _Optional[int] = ..., dry_run: _Optional[bool] = ..., team: _Optional[str] = ..., allow_empty: _Optional[bool] = ...) -> None: ...

class ApplyPolicyResponse(_message.Message):
    __slots__ = ("revision", "changed", "diff")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    revision: int
    changed: bool
    diff: str
    def __init__(self, revision: _Optional[int] = ..., changed: _Optional[bool] = ..., diff: _Optional[str] = ...) -> None: ...

class DiffPolicyRequest(_message.Message):
    __slots__ = ("documents", "against_revision", "team")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    AGAINST_REVISION_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    documents: str
    against_revision: int
    team: str
    def __init__(self, documents: _Optional[str] = ..., against_revision: _Optional[int] = ..., team: _Optional[str] = ...) -> None: ...

class DiffPolicyResponse(_message.Message):
    __slots__ = ("changed", "diff", "against_revision")
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    AGAINST_REVISION_FIELD_NUMBER: _ClassVar[int]
    changed: bool
    diff: str
    against_revision: int
    def __init__(self, changed: _Optional[bool] = ..., diff: _Optional[str] = ..., against_revision: _Optional[int] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class GetPolicyResponse(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: PolicyRevision
    def __init__(self, policy: _Optional[_Union[PolicyRevision, _Mapping]] = ...) -> None: ...

class ListPolicyRevisionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPolicyRevisionsResponse(_message.Message):
    __slots__ = ("revisions",)
    REVISIONS_FIELD_NUMBER: _ClassVar[int]
    revisions: _containers.RepeatedCompositeFieldContainer[PolicyRevision]
    def __init__(self, revisions: _Optional[_Iterable[_Union[PolicyRevision, _Mapping]]] = ...) -> None: ...

class RollbackPolicyRequest(_message.Message):
    __slots__ = ("revision", "author", "comment", "expected_head_revision")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_HEAD_REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    author: str
    comment: str
    expected_head_revision: int
    def __init__(self, revision: _Optional[int] = ..., author: _Optional[str] = ..., comment: _Optional[str] = ..., expected_head_revision: _Optional[int] = ...) -> None: ...

class RollbackPolicyResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class TeamOwnership(_message.Message):
    __slots__ = ("team", "destinations")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    DESTINATIONS_FIELD_NUMBER: _ClassVar[int]
    team: str
    destinations: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, team: _Optional[str] = ..., destinations: _Optional[_Iterable[str]] = ...) -> None: ...

class GetPolicyOwnersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPolicyOwnersResponse(_message.Message):
    __slots__ = ("teams", "documents", "updated_by", "updated_at")
    TEAMS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_BY_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    teams: _containers.RepeatedCompositeFieldContainer[TeamOwnership]
    documents: str
    updated_by: str
    updated_at: int
    def __init__(self, teams: _Optional[_Iterable[_Union[TeamOwnership, _Mapping]]] = ..., documents: _Optional[str] = ..., updated_by: _Optional[str] = ..., updated_at: _Optional[int] = ...) -> None: ...

class SetPolicyOwnersRequest(_message.Message):
    __slots__ = ("documents",)
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    documents: str
    def __init__(self, documents: _Optional[str] = ...) -> None: ...

class SetPolicyOwnersResponse(_message.Message):
    __slots__ = ("teams",)
    TEAMS_FIELD_NUMBER: _ClassVar[int]
    teams: _containers.RepeatedCompositeFieldContainer[TeamOwnership]
    def __init__(self, teams: _Optional[_Iterable[_Union[TeamOwnership, _Mapping]]] = ...) -> None: ...

class CAAuthority(_message.Message):
    __slots__ = ("kind", "state", "certificate", "serial", "key_id", "not_before", "not_after", "prepared_at", "activated_at", "retired_at", "replica", "key_store", "issuer")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    PREPARED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATED_AT_FIELD_NUMBER: _ClassVar[int]
    RETIRED_AT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    KEY_STORE_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    kind: CAAuthorityKind
    state: CAAuthorityState
    certificate: bytes
    serial: str
    key_id: str
    not_before: int
    not_after: int
    prepared_at: int
    activated_at: int
    retired_at: int
    replica: str
    key_store: str
    issuer: str
    def __init__(self, kind: _Optional[_Union[CAAuthorityKind, str]] = ..., state: _Optional[_Union[CAAuthorityState, str]] = ..., certificate: _Optional[bytes] = ..., serial: _Optional[str] = ..., key_id: _Optional[str] = ..., not_before: _Optional[int] = ..., not_after: _Optional[int] = ..., prepared_at: _Optional[int] = ..., activated_at: _Optional[int] = ..., retired_at: _Optional[int] = ..., replica: _Optional[str] = ..., key_store: _Optional[str] = ..., issuer: _Optional[str] = ...) -> None: ...

class GetCAJournalRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetCAJournalResponse(_message.Message):
    __slots__ = ("authorities", "leader", "next_step")
    AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    authorities: _containers.RepeatedCompositeFieldContainer[CAAuthority]
    leader: str
    next_step: str
    def __init__(self, authorities: _Optional[_Iterable[_Union[CAAuthority, _Mapping]]] = ..., leader: _Optional[str] = ..., next_step: _Optional[str] = ...) -> None: ...

class RotateRootRequest(_message.Message):
    __slots__ = ("step", "force")
    STEP_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    step: RootRotationStep
    force: bool
    def __init__(self, step: _Optional[_Union[RootRotationStep, str]] = ..., force: _Optional[bool] = ...) -> None: ...

class RotateRootResponse(_message.Message):
    __slots__ = ("authorities", "detail", "forced")
    AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    FORCED_FIELD_NUMBER: _ClassVar[int]
    authorities: _containers.RepeatedCompositeFieldContainer[CAAuthority]
    detail: str
    forced: bool
    def __init__(self, authorities: _Optional[_Iterable[_Union[CAAuthority, _Mapping]]] = ..., detail: _Optional[str] = ..., forced: _Optional[bool] = ...) -> None: ...

class IssuePartnerCertificateRequest(_message.Message):
    __slots__ = ("spiffe_id", "csr", "ttl_seconds")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    csr: bytes
    ttl_seconds: int
    def __init__(self, spiffe_id: _Optional[str] = ..., csr: _Optional[bytes] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class IssuePartnerCertificateResponse(_message.Message):
    __slots__ = ("cert_chain", "serial", "expires_at")
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    cert_chain: _containers.RepeatedScalarFieldContainer[bytes]
    serial: str
    expires_at: int
    def __init__(self, cert_chain: _Optional[_Iterable[bytes]] = ..., serial: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class RevokePartnerCertificateRequest(_message.Message):
    __slots__ = ("serial", "reason")
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    serial: str
    reason: str
    def __init__(self, serial: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokePartnerCertificateResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("since_seq", "since_time", "limit", "kind", "actor")
    SINCE_SEQ_FIELD_NUMBER: _ClassVar[int]
    SINCE_TIME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    since_seq: int
    since_time: int
    limit: int
    kind: str
    actor: str
    def __init__(self, since_seq: _Optional[int] = ..., since_time: _Optional[int] = ..., limit: _Optional[int] = ..., kind: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("events", "next_seq")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQ_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_types_pb2.AuditEvent]
    next_seq: int
    def __init__(self, events: _Optional[_Iterable[_Union[_types_pb2.AuditEvent, _Mapping]]] = ..., next_seq: _Optional[int] = ...) -> None: ...

class VerifyAuditRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifyAuditResponse(_message.Message):
    __slots__ = ("ok", "checked", "first_broken_seq", "reason", "records_checked", "record_failures", "anchored_seq", "anchor")
    OK_FIELD_NUMBER: _ClassVar[int]
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    FIRST_BROKEN_SEQ_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RECORDS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    RECORD_FAILURES_FIELD_NUMBER: _ClassVar[int]
    ANCHORED_SEQ_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    checked: int
    first_broken_seq: int
    reason: str
    records_checked: int
    record_failures: _containers.RepeatedScalarFieldContainer[str]
    anchored_seq: int
    anchor: str
    def __init__(self, ok: _Optional[bool] = ..., checked: _Optional[int] = ..., first_broken_seq: _Optional[int] = ..., reason: _Optional[str] = ..., records_checked: _Optional[int] = ..., record_failures: _Optional[_Iterable[str]] = ..., anchored_seq: _Optional[int] = ..., anchor: _Optional[str] = ...) -> None: ...

class Operator(_message.Message):
    __slots__ = ("name", "spiffe_id", "roles", "team", "state", "created_at", "created_by", "locked_until", "enrolled_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    LOCKED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    spiffe_id: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    team: str
    state: str
    created_at: int
    created_by: str
    locked_until: int
    enrolled_at: int
    def __init__(self, name: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., team: _Optional[str] = ..., state: _Optional[str] = ..., created_at: _Optional[int] = ..., created_by: _Optional[str] = ..., locked_until: _Optional[int] = ..., enrolled_at: _Optional[int] = ...) -> None: ...

class AddOperatorRequest(_message.Message):
    __slots__ = ("name", "roles", "team")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    name: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    team: str
    def __init__(self, name: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., team: _Optional[str] = ...) -> None: ...

class AddOperatorResponse(_message.Message):
    __slots__ = ("operator", "enrollment_token", "enrollment_expires_at")
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    operator: Operator
    enrollment_token: str
    enrollment_expires_at: int
    def __init__(self, operator: _Optional[_Union[Operator, _Mapping]] = ..., enrollment_token: _Optional[str] = ..., enrollment_expires_at: _Optional[int] = ...) -> None: ...

class ListOperatorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListOperatorsResponse(_message.Message):
    __slots__ = ("operators",)
    OPERATORS_FIELD_NUMBER: _ClassVar[int]
    operators: _containers.RepeatedCompositeFieldContainer[Operator]
    def __init__(self, operators: _Optional[_Iterable[_Union[Operator, _Mapping]]] = ...) -> None: ...

class DisableOperatorRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DisableOperatorResponse(_message.Message):
    __slots__ = ("operator",)
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    operator: Operator
    def __init__(self, operator: _Optional[_Union[Operator, _Mapping]] = ...) -> None: ...

class RemoveOperatorRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveOperatorResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetOperatorRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ResetOperatorResponse(_message.Message):
    __slots__ = ("operator", "enrollment_token", "enrollment_expires_at")
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    operator: Operator
    enrollment_token: str
    enrollment_expires_at: int
    def __init__(self, operator: _Optional[_Union[Operator, _Mapping]] = ..., enrollment_token: _Optional[str] = ..., enrollment_expires_at: _Optional[int] = ...) -> None: ...

class WhoAmIRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WhoAmIResponse(_message.Message):
    __slots__ = ("actor", "kind", "roles", "team", "source", "expires_at")
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    actor: str
    kind: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    team: str
    source: str
    expires_at: int
    def __init__(self, actor: _Optional[str] = ..., kind: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., team: _Optional[str] = ..., source: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("enrollment_token", "password")
    ENROLLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    enrollment_token: str
    password: str
    def __init__(self, enrollment_token: _Optional[str] = ..., password: _Optional[str] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("operator", "totp_uri")
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    TOTP_URI_FIELD_NUMBER: _ClassVar[int]
    operator: str
    totp_uri: str
    def __init__(self, operator: _Optional[str] = ..., totp_uri: _Optional[str] = ...) -> None: ...

class LoginRequest(_message.Message):
    __slots__ = ("operator", "password", "otp", "csr", "ttl_seconds")
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    OTP_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    operator: str
    password: str
    otp: str
    csr: bytes
    ttl_seconds: int
    def __init__(self, operator: _Optional[str] = ..., password: _Optional[str] = ..., otp: _Optional[str] = ..., csr: _Optional[bytes] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class LoginResponse(_message.Message):
    __slots__ = ("cert_chain", "expires_at", "spiffe_id", "roles")
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    cert_chain: _containers.RepeatedScalarFieldContainer[bytes]
    expires_at: int
    spiffe_id: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cert_chain: _Optional[_Iterable[bytes]] = ..., expires_at: _Optional[int] = ..., spiffe_id: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ...) -> None: ...

class AccessGrant(_message.Message):
    __slots__ = ("id", "source", "destination", "port", "duration_seconds", "reason", "requester", "created_at", "approve_by", "state", "approvals", "required_approvals", "starts_at", "expires_at", "decided_by", "decision_reason", "break_glass", "reviewed_by", "reviewed_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    APPROVE_BY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_APPROVALS_FIELD_NUMBER: _ClassVar[int]
    STARTS_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    DECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    BREAK_GLASS_FIELD_NUMBER: _ClassVar[int]
    REVIEWED_BY_FIELD_NUMBER: _ClassVar[int]
    REVIEWED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    source: str
    destination: str
    port: int
    duration_seconds: int
    reason: str
    requester: str
    created_at: int
    approve_by: int
    state: str
    approvals: _containers.RepeatedScalarFieldContainer[str]
    required_approvals: int
    starts_at: int
    expires_at: int
    decided_by: str
    decision_reason: str
    break_glass: bool
    reviewed_by: str
    reviewed_at: int
    def __init__(self, id: _Optional[str] = ..., source: _Optional[str] = ..., destination: _Optional[str] = ..., port: _Optional[int] = ..., duration_seconds: _Optional[int] = ..., reason: _Optional[str] = ..., requester: _Optional[str] = ..., created_at: _Optional[int] = ..., approve_by: _Optional[int] = ..., state: _Optional[str] = ..., approvals: _Optional[_Iterable[str]] = ..., required_approvals: _Optional[int] = ..., starts_at: _Optional[int] = ..., expires_at: _Optional[int] = ..., decided_by: _Optional[str] = ..., decision_reason: _Optional[str] = ..., break_glass: _Optional[bool] = ..., reviewed_by: _Optional[str] = ..., reviewed_at: _Optional[int] = ...) -> None: ...

class RequestAccessRequest(_message.Message):
    __slots__ = ("source", "destination", "port", "duration_seconds", "reason")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    source: str
    destination: str
    port: int
    duration_seconds: int
    reason: str
    def __init__(self, source: _Optional[str] = ..., destination: _Optional[str] = ..., port: _Optional[int] = ..., duration_seconds: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RequestAccessResponse(_message.Message):
    __slots__ = ("grant",)
    GRANT_FIELD_NUMBER: _ClassVar[int]
    grant: AccessGrant
    def __init__(self, grant: _Optional[_Union[AccessGrant, _Mapping]] = ...) -> None: ...

class ApproveAccessRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ApproveAccessResponse(_message.Message):
    __slots__ = ("grant",)
    GRANT_FIELD_NUMBER: _ClassVar[int]
    grant: AccessGrant
    def __init__(self, grant: _Optional[_Union[AccessGrant, _Mapping]] = ...) -> None: ...

class DenyAccessRequest(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DenyAccessResponse(_message.Message):
    __slots__ = ("grant",)
    GRANT_FIELD_NUMBER: _ClassVar[int]
    grant: AccessGrant
    def __init__(self, grant: _Optional[_Union[AccessGrant, _Mapping]] = ...) -> None: ...

class ListAccessRequest(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: str
    def __init__(self, state: _Optional[str] = ...) -> None: ...

class ListAccessResponse(_message.Message):
    __slots__ = ("grants",)
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    grants: _containers.RepeatedCompositeFieldContainer[AccessGrant]
    def __init__(self, grants: _Optional[_Iterable[_Union[AccessGrant, _Mapping]]] = ...) -> None: ...

class RevokeAccessRequest(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeAccessResponse(_message.Message):
    __slots__ = ("grant",)
    GRANT_FIELD_NUMBER: _ClassVar[int]
    grant: AccessGrant
    def __init__(self, grant: _Optional[_Union[AccessGrant, _Mapping]] = ...) -> None: ...

class BreakGlassRequest(_message.Message):
    __slots__ = ("source", "destination", "port", "duration_seconds", "reason")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    source: str
    destination: str
    port: int
    duration_seconds: int
    reason: str
    def __init__(self, source: _Optional[str] = ..., destination: _Optional[str] = ..., port: _Optional[int] = ..., duration_seconds: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class BreakGlassResponse(_message.Message):
    __slots__ = ("grant",)
    GRANT_FIELD_NUMBER: _ClassVar[int]
    grant: AccessGrant
    def __init__(self, grant: _Optional[_Union[AccessGrant, _Mapping]] = ...) -> None: ...

class ReviewAccessRequest(_message.Message):
    __slots__ = ("id", "note")
    ID_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    id: str
    note: str
    def __init__(self, id: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class ReviewAccessResponse(_message.Message):
    __slots__ = ("grant",)
    GRANT_FIELD_NUMBER: _ClassVar[int]
    grant: AccessGrant
    def __init__(self, grant: _Optional[_Union[AccessGrant, _Mapping]] = ...) -> None: ...

class FlowEdge(_message.Message):
    __slots__ = ("source", "destination", "port", "decision", "rule", "connections", "bytes_in", "bytes_out", "first_seen", "last_seen", "source_address", "route")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    source: str
    destination: str
    port: int
    decision: str
    rule: str
    connections: int
    bytes_in: int
    bytes_out: int
    first_seen: int
    last_seen: int
    source_address: str
    route: str
    def __init__(self, source: _Optional[str] = ..., destination: _Optional[str] = ..., port: _Optional[int] = ..., decision: _Optional[str] = ..., rule: _Optional[str] = ..., connections: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., first_seen: _Optional[int] = ..., last_seen: _Optional[int] = ..., source_address: _Optional[str] = ..., route: _Optional[str] = ...) -> None: ...

class ListFlowsRequest(_message.Message):
    __slots__ = ("since", "source", "destination", "decision")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    since: int
    source: str
    destination: str
    decision: str
    def __init__(self, since: _Optional[int] = ..., source: _Optional[str] = ..., destination: _Optional[str] = ..., decision: _Optional[str] = ...) -> None: ...

class ListFlowsResponse(_message.Message):
    __slots__ = ("edges", "since", "until")
    EDGES_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    edges: _containers.RepeatedCompositeFieldContainer[FlowEdge]
    since: int
    until: int
    def __init__(self, edges: _Optional[_Iterable[_Union[FlowEdge, _Mapping]]] = ..., since: _Optional[int] = ..., until: _Optional[int] = ...) -> None: ...

class ExportTraceRequest(_message.Message):
    __slots__ = ("since", "until")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    since: int
    until: int
    def __init__(self, since: _Optional[int] = ..., until: _Optional[int] = ...) -> None: ...

class ExportTraceResponse(_message.Message):
    __slots__ = ("lines",)
    LINES_FIELD_NUMBER: _ClassVar[int]
    lines: bytes
    def __init__(self, lines: _Optional[bytes] = ...) -> None: ...

class Quarantine(_message.Message):
    __slots__ = ("target", "kind", "reason", "evidence", "detector", "score", "created_by", "created_at", "node")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    target: str
    kind: str
    reason: str
    evidence: _containers.RepeatedScalarFieldContainer[str]
    detector: str
    score: float
    created_by: str
    created_at: int
    node: str
    def __init__(self, target: _Optional[str] = ..., kind: _Optional[str] = ..., reason: _Optional[str] = ..., evidence: _Optional[_Iterable[str]] = ..., detector: _Optional[str] = ..., score: _Optional[float] = ..., created_by: _Optional[str] = ..., created_at: _Optional[int] = ..., node: _Optional[str] = ...) -> None: ...

class ListQuarantinesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListQuarantinesResponse(_message.Message):
    __slots__ = ("quarantines",)
    QUARANTINES_FIELD_NUMBER: _ClassVar[int]
    quarantines: _containers.RepeatedCompositeFieldContainer[Quarantine]
    def __init__(self, quarantines: _Optional[_Iterable[_Union[Quarantine, _Mapping]]] = ...) -> None: ...

class AddQuarantineRequest(_message.Message):
    __slots__ = ("target", "kind", "reason")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    target: str
    kind: str
    reason: str
    def __init__(self, target: _Optional[str] = ..., kind: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AddQuarantineResponse(_message.Message):
    __slots__ = ("quarantine",)
    QUARANTINE_FIELD_NUMBER: _ClassVar[int]
    quarantine: Quarantine
    def __init__(self, quarantine: _Optional[_Union[Quarantine, _Mapping]] = ...) -> None: ...

class ReleaseQuarantineRequest(_message.Message):
    __slots__ = ("target", "reason")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    target: str
    reason: str
    def __init__(self, target: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleaseQuarantineResponse(_message.Message):
    __slots__ = ("quarantine",)
    QUARANTINE_FIELD_NUMBER: _ClassVar[int]
    quarantine: Quarantine
    def __init__(self, quarantine: _Optional[_Union[Quarantine, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StoreMember(_message.Message):
    __slots__ = ("name", "endpoint", "healthy", "leader", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    endpoint: str
    healthy: bool
    leader: bool
    error: str
    def __init__(self, name: _Optional[str] = ..., endpoint: _Optional[str] = ..., healthy: _Optional[bool] = ..., leader: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class ServerListener(_message.Message):
    __slots__ = ("name", "address")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class AgentPresence(_message.Message):
    __slots__ = ("spiffe_id", "last_seen")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    last_seen: int
    def __init__(self, spiffe_id: _Optional[str] = ..., last_seen: _Optional[int] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("trust_domain", "replica_id", "server_time_ms", "leader", "ready", "store_backend", "store_members", "store_error", "authorities", "root_ttl_seconds", "ca_ttl_seconds", "agent_ttl_seconds", "server_svid_chain", "listeners", "bundle_endpoint_profile", "oidc_issuer", "oidc_discovery_bind", "oidc_serves_server_svid", "policy_revision", "agents")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    STORE_BACKEND_FIELD_NUMBER: _ClassVar[int]
    STORE_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    STORE_ERROR_FIELD_NUMBER: _ClassVar[int]
    AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    ROOT_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CA_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGENT_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SERVER_SVID_CHAIN_FIELD_NUMBER: _ClassVar[int]
    LISTENERS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ENDPOINT_PROFILE_FIELD_NUMBER: _ClassVar[int]
    OIDC_ISSUER_FIELD_NUMBER: _ClassVar[int]
    OIDC_DISCOVERY_BIND_FIELD_NUMBER: _ClassVar[int]
    OIDC_SERVES_SERVER_SVID_FIELD_NUMBER: _ClassVar[int]
    POLICY_REVISION_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    replica_id: str
    server_time_ms: int
    leader: str
    ready: bool
    store_backend: str
    store_members: _containers.RepeatedCompositeFieldContainer[StoreMember]
    store_error: str
    authorities: _containers.RepeatedCompositeFieldContainer[CAAuthority]
    root_ttl_seconds: int
    ca_ttl_seconds: int
    agent_ttl_seconds: int
    server_svid_chain: _containers.RepeatedScalarFieldContainer[bytes]
    listeners: _containers.RepeatedCompositeFieldContainer[ServerListener]
    bundle_endpoint_profile: str
    oidc_issuer: str
    oidc_discovery_bind: str
    oidc_serves_server_svid: bool
    policy_revision: int
    agents: _containers.RepeatedCompositeFieldContainer[AgentPresence]
    def __init__(self, trust_domain: _Optional[str] = ..., replica_id: _Optional[str] = ..., server_time_ms: _Optional[int] = ..., leader: _Optional[str] = ..., ready: _Optional[bool] = ..., store_backend: _Optional[str] = ..., store_members: _Optional[_Iterable[_Union[StoreMember, _Mapping]]] = ..., store_error: _Optional[str] = ..., authorities: _Optional[_Iterable[_Union[CAAuthority, _Mapping]]] = ..., root_ttl_seconds: _Optional[int] = ..., ca_ttl_seconds: _Optional[int] = ..., agent_ttl_seconds: _Optional[int] = ..., server_svid_chain: _Optional[_Iterable[bytes]] = ..., listeners: _Optional[_Iterable[_Union[ServerListener, _Mapping]]] = ..., bundle_endpoint_profile: _Optional[str] = ..., oidc_issuer: _Optional[str] = ..., oidc_discovery_bind: _Optional[str] = ..., oidc_serves_server_svid: _Optional[bool] = ..., policy_revision: _Optional[int] = ..., agents: _Optional[_Iterable[_Union[AgentPresence, _Mapping]]] = ...) -> None: ...
