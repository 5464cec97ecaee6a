"""Typed errors: a failed call as a `KeelError` subclass per gRPC code, with
the `google.rpc.Status` details keel sends (`grpc-status-details-bin`)
decoded, e.g. the field violations of a `google.rpc.BadRequest`."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from keel_client.proto.google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


class KeelError(Exception):
    """A call that keel (or the transport) answered with a non-OK status."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        details: list[Message] | None = None,
        status: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        # The details, unpacked into their generated classes (a detail whose
        # type is unknown here stays an `Any`).
        self.details: list[Message] = details or []
        self.status = status

    @property
    def bad_request(self) -> error_details_pb2.BadRequest | None:
        for detail in self.details:
            if isinstance(detail, error_details_pb2.BadRequest):
                return detail
        return None

    @property
    def field_violations(self) -> dict[str, str]:
        """Field path -> description, from the BadRequest detail."""
        bad_request = self.bad_request
        if bad_request is None:
            return {}
        return {violation.field: violation.description for violation in bad_request.field_violations}

    @property
    def error_info(self) -> error_details_pb2.ErrorInfo | None:
        for detail in self.details:
            if isinstance(detail, error_details_pb2.ErrorInfo):
                return detail
        return None

    @staticmethod
    def from_rpc_error(error: grpc.RpcError) -> KeelError:
        """The typed error of a grpcio `RpcError` (a `grpc.Call` for a call
        that reached the server)."""
        if not isinstance(error, grpc.Call):
            return KeelError(grpc.StatusCode.UNKNOWN, str(error))
        code = error.code()
        text = error.details() or ""
        status = _status(error.trailing_metadata() or ())
        details = [_unpack(detail) for detail in status.details] if status is not None else []
        cls = _BY_CODE.get(code, KeelError)
        return cls(code, text, details, status)


class InvalidArgument(KeelError):
    pass


class Unauthenticated(KeelError):
    pass


class PermissionDenied(KeelError):
    pass


class NotFound(KeelError):
    pass


class AlreadyExists(KeelError):
    pass


class FailedPrecondition(KeelError):
    pass


class Aborted(KeelError):
    pass


class ResourceExhausted(KeelError):
    pass


class DeadlineExceeded(KeelError):
    pass


class Unavailable(KeelError):
    pass


class Unimplemented(KeelError):
    pass


class Internal(KeelError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[KeelError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
}


def _status(metadata: tuple[tuple[str, str | bytes], ...]) -> status_pb2.Status | None:
    for key, value in metadata:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def _unpack(detail: any_pb2.Any) -> Message:
    name = detail.TypeName()
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(name)
    except KeyError:
        return detail
    unpacked = message_factory.GetMessageClass(descriptor)()
    if not detail.Unpack(unpacked):
        return detail
    return unpacked
