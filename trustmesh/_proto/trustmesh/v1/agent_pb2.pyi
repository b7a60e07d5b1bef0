# trustmesh: generated from proto/trustmesh/v1/agent.proto by scripts/gen-proto; do not edit.
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class AuthorizeRequest(_message.Message):
    __slots__ = ("source_id", "destination_id", "port")
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    source_id: str
    destination_id: str
    port: int
    def __init__(self, source_id: _Optional[str] = ..., destination_id: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class AuthorizeResponse(_message.Message):
    __slots__ = ("allowed", "rule", "reason", "audit_only", "policy_revision")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AUDIT_ONLY_FIELD_NUMBER: _ClassVar[int]
    POLICY_REVISION_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    rule: str
    reason: str
    audit_only: bool
    policy_revision: int
    def __init__(self, allowed: _Optional[bool] = ..., rule: _Optional[str] = ..., reason: _Optional[str] = ..., audit_only: _Optional[bool] = ..., policy_revision: _Optional[int] = ...) -> None: ...
