"""`Client`: one grpcio channel to keel, the generated stubs of every
module over it, login, a bearer token on every call, and refresh before the
access token expires."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from keel_client.errors import KeelError
from keel_client.proto.grpc.health.v1 import health_pb2_grpc
from keel_client.proto.keel.events.v1 import commands_pb2_grpc as events_commands_grpc
from keel_client.proto.keel.events.v1 import queries_pb2_grpc as events_queries_grpc
from keel_client.proto.keel.identity.v1 import commands_pb2, types_pb2
from keel_client.proto.keel.identity.v1 import commands_pb2_grpc as identity_commands_grpc
from keel_client.proto.keel.identity.v1 import queries_pb2_grpc as identity_queries_grpc

_Request = TypeVar("_Request")


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        # Not on every grpcio's details object.
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class _ErrorMapping(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Raises `KeelError` (with decoded details) instead of `grpc.RpcError`."""

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, _Request], Any],
        client_call_details: grpc.ClientCallDetails,
        request: _Request,
    ) -> Any:
        outcome = continuation(client_call_details, request)
        error = outcome.exception()
        if isinstance(error, grpc.RpcError):
            raise KeelError.from_rpc_error(error) from error
        return outcome

    def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, _Request], Any],
        client_call_details: grpc.ClientCallDetails,
        request: _Request,
    ) -> Any:
        return _MappedStream(continuation(client_call_details, request))


class _MappedStream:
    """A server stream whose errors arrive as `KeelError`; the rest of the
    call (cancel, code, trailing metadata) is the grpcio call's."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> _MappedStream:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as error:
            raise KeelError.from_rpc_error(error) from error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <access token>` when logged in,
    refreshing the token first when it is about to expire."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        token = self._client._fresh_access_token()
        if token is None:
            return details
        metadata = tuple(details.metadata or ()) + (("authorization", f"Bearer {token}"),)
        return _CallDetails(details, metadata)

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, _Request], Any],
        client_call_details: grpc.ClientCallDetails,
        request: _Request,
    ) -> Any:
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, _Request], Any],
        client_call_details: grpc.ClientCallDetails,
        request: _Request,
    ) -> Any:
        return continuation(self._with_token(client_call_details), request)


class Client:
    """A keel client over one gRPC channel.

    >>> client = Client("127.0.0.1:8080")
    >>> client.login("ada@example.com", "correct horse battery staple")
    >>> me = client.identity_queries.GetCurrentUser(GetCurrentUserRequest()).user

    Every stub attribute carries the bearer token once `login` succeeded;
    failed calls raise `keel_client.errors.KeelError` subclasses.

    The access token is refreshed (RefreshSession, one caller at a time)
    when less than `refresh_margin` seconds of its lifetime are left, or
    less than half of it for tokens shorter than twice the margin.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        refresh_margin: float = 60.0,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._refresh_margin = refresh_margin
        # Guards the tokens: concurrent callers that find the access token
        # due refresh it once (the refresh token is single-use: a second
        # refresh with the same one would look like a stolen token).
        self._lock = threading.Lock()
        self._tokens: types_pb2.AuthTokens | None = None
        self._refresh_at = 0.0
        self.refreshes = 0

        public = grpc.intercept_channel(self._channel, _ErrorMapping())
        authed = grpc.intercept_channel(self._channel, _ErrorMapping(), _Bearer(self))
        self._public_commands = identity_commands_grpc.IdentityCommandServiceStub(public)

        self.identity_commands = identity_commands_grpc.IdentityCommandServiceStub(authed)
        self.identity_queries = identity_queries_grpc.IdentityQueryServiceStub(authed)
        self.events_commands = events_commands_grpc.EventCommandServiceStub(authed)
        self.events_queries = events_queries_grpc.EventQueryServiceStub(authed)
        self.health = health_pb2_grpc.HealthStub(public)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @property
    def tokens(self) -> types_pb2.AuthTokens | None:
        return self._tokens

    def login(self, email: str, password: str, *, timeout: float | None = 30.0) -> types_pb2.User:
        """Logs in and keeps the tokens; the user."""
        response = self._public_commands.Login(
            commands_pb2.LoginRequest(email=email, password=password), timeout=timeout
        )
        with self._lock:
            self._keep(response.tokens)
        return response.user

    def logout(self, *, timeout: float | None = 30.0) -> None:
        """Ends the session on the server, then forgets the tokens."""
        self.identity_commands.Logout(commands_pb2.LogoutRequest(), timeout=timeout)
        with self._lock:
            self._tokens = None

    def _keep(self, tokens: types_pb2.AuthTokens) -> None:
        now = time.time()
        expires_at = tokens.access_token_expires_at.ToNanoseconds() / 1e9
        lifetime = max(expires_at - now, 0.0)
        self._refresh_at = expires_at - min(self._refresh_margin, lifetime / 2)
        self._tokens = tokens

    def _fresh_access_token(self) -> str | None:
        with self._lock:
            if self._tokens is None:
                return None
            if time.time() >= self._refresh_at:
                response = self._public_commands.RefreshSession(
                    commands_pb2.RefreshSessionRequest(refresh_token=self._tokens.refresh_token),
                    timeout=30.0,
                )
                self._keep(response.tokens)
                self.refreshes += 1
            return self._tokens.access_token
