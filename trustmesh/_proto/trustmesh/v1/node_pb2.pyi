# trustmesh: generated from proto/trustmesh/v1/node.proto by scripts/gen-proto; do not edit.
from trustmesh._proto.trustmesh.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FlowDecision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLOW_DECISION_UNSPECIFIED: _ClassVar[FlowDecision]
    FLOW_DECISION_ALLOW: _ClassVar[FlowDecision]
    FLOW_DECISION_DENY: _ClassVar[FlowDecision]
    FLOW_DECISION_UNVERIFIED: _ClassVar[FlowDecision]
FLOW_DECISION_UNSPECIFIED: FlowDecision
FLOW_DECISION_ALLOW: FlowDecision
FLOW_DECISION_DENY: FlowDecision
FLOW_DECISION_UNVERIFIED: FlowDecision

class AttestRequest(_message.Message):
    __slots__ = ("csr", "join_token", "x509pop", "challenge_response")
    CSR_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    X509POP_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    csr: bytes
    join_token: str
    x509pop: X509PopEvidence
    challenge_response: X509PopChallengeResponse
    def __init__(self, csr: _Optional[bytes] = ..., join_token: _Optional[str] = ..., x509pop: _Optional[_Union[X509PopEvidence, _Mapping]] = ..., challenge_response: _Optional[_Union[X509PopChallengeResponse, _Mapping]] = ...) -> None: ...

class X509PopEvidence(_message.Message):
    __slots__ = ("cert_chain",)
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    cert_chain: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, cert_chain: _Optional[_Iterable[bytes]] = ...) -> None: ...

class X509PopChallengeResponse(_message.Message):
    __slots__ = ("signature",)
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    def __init__(self, signature: _Optional[bytes] = ...) -> None: ...

class AttestResponse(_message.Message):
    __slots__ = ("challenge", "result")
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    challenge: X509PopChallenge
    result: AttestResult
    def __init__(self, challenge: _Optional[_Union[X509PopChallenge, _Mapping]] = ..., result: _Optional[_Union[AttestResult, _Mapping]] = ...) -> None: ...

class X509PopChallenge(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class AttestResult(_message.Message):
    __slots__ = ("spiffe_id", "svid_chain", "bundle")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    SVID_CHAIN_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    svid_chain: _containers.RepeatedScalarFieldContainer[bytes]
    bundle: _types_pb2.Bundle
    def __init__(self, spiffe_id: _Optional[str] = ..., svid_chain: _Optional[_Iterable[bytes]] = ..., bundle: _Optional[_Union[_types_pb2.Bundle, _Mapping]] = ...) -> None: ...

class RenewAgentRequest(_message.Message):
    __slots__ = ("csr",)
    CSR_FIELD_NUMBER: _ClassVar[int]
    csr: bytes
    def __init__(self, csr: _Optional[bytes] = ...) -> None: ...

class RenewAgentResponse(_message.Message):
    __slots__ = ("svid_chain",)
    SVID_CHAIN_FIELD_NUMBER: _ClassVar[int]
    svid_chain: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, svid_chain: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ("since_revision", "bundle_sequences", "policy_revision", "permissive_listeners", "features")
    class BundleSequencesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SINCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    POLICY_REVISION_FIELD_NUMBER: _ClassVar[int]
    PERMISSIVE_LISTENERS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    since_revision: int
    bundle_sequences: _containers.ScalarMap[str, int]
    policy_revision: int
    permissive_listeners: _containers.RepeatedScalarFieldContainer[str]
    features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, since_revision: _Optional[int] = ..., bundle_sequences: _Optional[_Mapping[str, int]] = ..., policy_revision: _Optional[int] = ..., permissive_listeners: _Optional[_Iterable[str]] = ..., features: _Optional[_Iterable[str]] = ...) -> None: ...

class SyncResponse(_message.Message):
    __slots__ = ("revision", "snapshot", "delta")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    revision: int
    snapshot: SyncSnapshot
    delta: SyncDelta
    def __init__(self, revision: _Optional[int] = ..., snapshot: _Optional[_Union[SyncSnapshot, _Mapping]] = ..., delta: _Optional[_Union[SyncDelta, _Mapping]] = ...) -> None: ...

class SyncSnapshot(_message.Message):
    __slots__ = ("entries", "bundles", "policy", "page", "last")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[_types_pb2.Entry]
    bundles: _containers.RepeatedCompositeFieldContainer[_types_pb2.Bundle]
    policy: _types_pb2.CompiledPolicy
    page: int
    last: bool
    def __init__(self, entries: _Optional[_Iterable[_Union[_types_pb2.Entry, _Mapping]]] = ..., bundles: _Optional[_Iterable[_Union[_types_pb2.Bundle, _Mapping]]] = ..., policy: _Optional[_Union[_types_pb2.CompiledPolicy, _Mapping]] = ..., page: _Optional[int] = ..., last: _Optional[bool] = ...) -> None: ...

class SyncDelta(_message.Message):
    __slots__ = ("upserted_entries", "deleted_entry_ids", "bundles", "deleted_bundles", "policy")
    UPSERTED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    DELETED_ENTRY_IDS_FIELD_NUMBER: _ClassVar[int]
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    DELETED_BUNDLES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    upserted_entries: _containers.RepeatedCompositeFieldContainer[_types_pb2.Entry]
    deleted_entry_ids: _containers.RepeatedScalarFieldContainer[str]
    bundles: _containers.RepeatedCompositeFieldContainer[_types_pb2.Bundle]
    deleted_bundles: _containers.RepeatedScalarFieldContainer[str]
    policy: _types_pb2.CompiledPolicy
    def __init__(self, upserted_entries: _Optional[_Iterable[_Union[_types_pb2.Entry, _Mapping]]] = ..., deleted_entry_ids: _Optional[_Iterable[str]] = ..., bundles: _Optional[_Iterable[_Union[_types_pb2.Bundle, _Mapping]]] = ..., deleted_bundles: _Optional[_Iterable[str]] = ..., policy: _Optional[_Union[_types_pb2.CompiledPolicy, _Mapping]] = ...) -> None: ...

class BatchSignX509Request(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[X509SignItem]
    def __init__(self, items: _Optional[_Iterable[_Union[X509SignItem, _Mapping]]] = ...) -> None: ...

class X509SignItem(_message.Message):
    __slots__ = ("entry_id", "csr")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    csr: bytes
    def __init__(self, entry_id: _Optional[str] = ..., csr: _Optional[bytes] = ...) -> None: ...

class BatchSignX509Response(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[X509SignResult]
    def __init__(self, results: _Optional[_Iterable[_Union[X509SignResult, _Mapping]]] = ...) -> None: ...

class X509SignResult(_message.Message):
    __slots__ = ("entry_id", "svid", "error")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    SVID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    svid: X509Svid
    error: ItemError
    def __init__(self, entry_id: _Optional[str] = ..., svid: _Optional[_Union[X509Svid, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class X509Svid(_message.Message):
    __slots__ = ("spiffe_id", "cert_chain", "expires_at")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    cert_chain: _containers.RepeatedScalarFieldContainer[bytes]
    expires_at: int
    def __init__(self, spiffe_id: _Optional[str] = ..., cert_chain: _Optional[_Iterable[bytes]] = ..., expires_at: _Optional[int] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SignJWTRequest(_message.Message):
    __slots__ = ("entry_id", "audiences")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIENCES_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    audiences: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, entry_id: _Optional[str] = ..., audiences: _Optional[_Iterable[str]] = ...) -> None: ...

class SignJWTResponse(_message.Message):
    __slots__ = ("token", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_at: int
    def __init__(self, token: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class FlowCounter(_message.Message):
    __slots__ = ("source_id", "destination_id", "port", "decision", "rule", "mode", "count", "first_seen", "last_seen", "bytes_in", "bytes_out", "source_address", "route")
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    source_id: str
    destination_id: str
    port: int
    decision: FlowDecision
    rule: str
    mode: _types_pb2.PolicyMode
    count: int
    first_seen: int
    last_seen: int
    bytes_in: int
    bytes_out: int
    source_address: str
    route: str
    def __init__(self, source_id: _Optional[str] = ..., destination_id: _Optional[str] = ..., port: _Optional[int] = ..., decision: _Optional[_Union[FlowDecision, str]] = ..., rule: _Optional[str] = ..., mode: _Optional[_Union[_types_pb2.PolicyMode, str]] = ..., count: _Optional[int] = ..., first_seen: _Optional[int] = ..., last_seen: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., source_address: _Optional[str] = ..., route: _Optional[str] = ...) -> None: ...

class RefusalCounter(_message.Message):
    __slots__ = ("kind", "subject", "peer", "reason", "count", "first_seen", "last_seen")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    kind: str
    subject: str
    peer: str
    reason: str
    count: int
    first_seen: int
    last_seen: int
    def __init__(self, kind: _Optional[str] = ..., subject: _Optional[str] = ..., peer: _Optional[str] = ..., reason: _Optional[str] = ..., count: _Optional[int] = ..., first_seen: _Optional[int] = ..., last_seen: _Optional[int] = ...) -> None: ...

class ReportFlowsRequest(_message.Message):
    __slots__ = ("counters", "refusals")
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    counters: _containers.RepeatedCompositeFieldContainer[FlowCounter]
    refusals: _containers.RepeatedCompositeFieldContainer[RefusalCounter]
    def __init__(self, counters: _Optional[_Iterable[_Union[FlowCounter, _Mapping]]] = ..., refusals: _Optional[_Iterable[_Union[RefusalCounter, _Mapping]]] = ...) -> None: ...

class ReportFlowsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
