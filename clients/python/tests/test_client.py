"""keel_client.Client against a real keel (see conftest.py)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from keel_client import Client
from keel_client.errors import InvalidArgument, KeelError, Unauthenticated
from keel_client.proto.google.rpc import error_details_pb2
from keel_client.proto.keel.events.v1 import queries_pb2 as events_queries
from keel_client.proto.keel.identity.v1 import commands_pb2, queries_pb2, types_pb2

from .conftest import PASSWORD, Keel


def register(client: Client, email: str) -> types_pb2.User:
    request = commands_pb2.RegisterRequest(email=email, password=PASSWORD, display_name="Ada")
    return client.identity_commands.Register(request, timeout=30).user


def test_register_login_and_get_current_user(keel: Keel, email: str) -> None:
    with Client(keel.target) as client:
        registered = register(client, email)
        assert registered.email == email
        assert registered.id

        user = client.login(email, PASSWORD)
        assert user.id == registered.id
        assert client.tokens is not None and client.tokens.access_token

        me = client.identity_queries.GetCurrentUser(queries_pb2.GetCurrentUserRequest(), timeout=10).user
        assert me.id == registered.id
        assert me.display_name == "Ada"
        assert me.role == types_pb2.ROLE_USER


def test_calls_without_login_are_unauthenticated(keel: Keel) -> None:
    with Client(keel.target) as client:
        with pytest.raises(Unauthenticated) as raised:
            client.identity_queries.GetCurrentUser(queries_pb2.GetCurrentUserRequest(), timeout=10)
        assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_invalid_argument_carries_decoded_field_violations(keel: Keel) -> None:
    with Client(keel.target) as client:
        request = commands_pb2.RegisterRequest(email="not an email", password="short", display_name="")
        with pytest.raises(InvalidArgument) as raised:
            client.identity_commands.Register(request, timeout=30)
    error = raised.value
    assert isinstance(error, KeelError)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(error.bad_request, error_details_pb2.BadRequest)
    violations = error.field_violations
    assert {"email", "password"} <= set(violations), violations
    assert all(violations.values()), "every violation has a description"


def test_subscribe_streams_the_users_events(keel: Keel, email: str) -> None:
    with Client(keel.target) as client:
        register(client, email)
        client.login(email, PASSWORD)
        request = events_queries.SubscribeRequest(topics=["identity.*"], after_sequence=0)
        # The timeout is the deadline of the whole stream: a missing event
        # fails the test instead of hanging it.
        stream = client.events_queries.Subscribe(request, timeout=20)
        seen: list[str] = []
        for response in stream:
            if response.WhichOneof("kind") == "event":
                assert response.sequence > 0
                seen.append(response.event.event_name)
                if response.event.event_name == "identity.user.logged_in":
                    break
        stream.cancel()
        assert "identity.user.logged_in" in seen, seen


def wait_for_refresh_point(client: Client) -> str:
    """Waits until the access token is in its last half-life (the refresh
    window for a 3 s token), still before it expires; the old token."""
    assert client.tokens is not None
    expires_at = client.tokens.access_token_expires_at.ToNanoseconds() / 1e9
    lifetime = expires_at - time.time()
    # Real time has to pass for a token to age; nothing else to wait on.
    time.sleep(max(lifetime / 2 + 0.3, 0))
    assert time.time() < expires_at, "the test machine was too slow to stay inside the lifetime"
    return client.tokens.access_token


def test_the_access_token_is_refreshed_before_it_expires(short_lived_keel: Keel, email: str) -> None:
    with Client(short_lived_keel.target) as client:
        register(client, email)
        client.login(email, PASSWORD)
        assert client.tokens is not None
        first_expiry = client.tokens.access_token_expires_at.ToNanoseconds()
        first = wait_for_refresh_point(client)

        me = client.identity_queries.GetCurrentUser(queries_pb2.GetCurrentUserRequest(), timeout=10).user
        assert me.email == email
        assert client.refreshes == 1
        assert client.tokens.access_token != first
        assert client.tokens.access_token_expires_at.ToNanoseconds() > first_expiry

        # A fresh token is not refreshed again.
        client.identity_queries.GetCurrentUser(queries_pb2.GetCurrentUserRequest(), timeout=10)
        assert client.refreshes == 1


def test_concurrent_callers_refresh_once(short_lived_keel: Keel, email: str) -> None:
    with Client(short_lived_keel.target) as client:
        register(client, email)
        client.login(email, PASSWORD)
        wait_for_refresh_point(client)
        with ThreadPoolExecutor(max_workers=8) as pool:
            calls = [
                pool.submit(
                    client.identity_queries.GetCurrentUser, queries_pb2.GetCurrentUserRequest(), timeout=10
                )
                for _ in range(8)
            ]
            users = [call.result().user.email for call in calls]
        assert users == [email] * 8
        assert client.refreshes == 1


def test_logout_ends_the_session(keel: Keel, email: str) -> None:
    with Client(keel.target) as client:
        register(client, email)
        client.login(email, PASSWORD)
        assert client.tokens is not None
        token = client.tokens.access_token
        client.logout()
        assert client.tokens is None
        with pytest.raises(Unauthenticated):
            client.identity_queries.GetCurrentUser(
                queries_pb2.GetCurrentUserRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10
            )
