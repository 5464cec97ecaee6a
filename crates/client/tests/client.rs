//! keel-client against a real keel (keel-testkit spawns it on port 0).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use keel_client::{Client, StatusExt, identity};
use keel_testkit::{Backend, PASSWORD, spawn_app, spawn_app_with};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_then_calls_carry_the_bearer_token() {
    let app = spawn_app(Backend::Sqlite).await;
    let registered = app.register("ada@example.com").await;
    let client = Client::connect(app.endpoint()).await.unwrap();

    // Before login: no token, so a user method is refused.
    let anonymous = client
        .identity_queries()
        .get_current_user(identity::GetCurrentUserRequest {})
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");

    let user = client.login("ada@example.com", PASSWORD).await.unwrap();
    assert_eq!(user.id, registered.id);
    let me = client
        .identity_queries()
        .get_current_user(identity::GetCurrentUserRequest {})
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(me.id, registered.id);
    assert_eq!(client.refreshes(), 0, "a fresh token is not refreshed");

    // A clone shares the session.
    let sessions = client
        .clone()
        .identity_queries()
        .list_sessions(identity::ListSessionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sessions.sessions.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_unauthenticated() {
    let app = spawn_app(Backend::Sqlite).await;
    app.register("ada@example.com").await;
    let client = Client::connect(app.endpoint()).await.unwrap();
    let error = client.login("ada@example.com", "not the password").await.unwrap_err();
    assert_eq!(error.code(), Code::Unauthenticated, "{error:?}");
    assert_eq!(client.access_token().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_token_is_refreshed_before_expiry_once_for_concurrent_callers() {
    // 4 s tokens: refreshed in their last half (the margin is capped at half
    // the lifetime), while the old token is still valid.
    let app = spawn_app_with(Backend::Sqlite, |config| config.access_token_ttl_seconds = 4).await;
    app.register("ada@example.com").await;
    let client = Client::connect(app.endpoint()).await.unwrap();
    client.login("ada@example.com", PASSWORD).await.unwrap();
    let first = client.access_token().await.unwrap().unwrap();
    assert_eq!(client.refreshes(), 0);

    // Real time has to pass for a token to age: past half of its lifetime,
    // short of its expiry.
    tokio::time::sleep(Duration::from_millis(2_300)).await;

    let calls = (0..8).map(|_| {
        let client = client.clone();
        async move {
            client
                .identity_queries()
                .get_current_user(identity::GetCurrentUserRequest {})
                .await
                .map(|response| response.into_inner().user.unwrap().email)
        }
    });
    let emails = futures::future::join_all(calls).await;
    for email in emails {
        assert_eq!(email.unwrap(), "ada@example.com");
    }
    assert_eq!(client.refreshes(), 1, "eight concurrent callers, one refresh");
    let second = client.access_token().await.unwrap().unwrap();
    assert_ne!(first, second, "the refresh replaced the access token");

    // The new token is the server's own: it authenticates a plain call.
    assert_eq!(app.current_user(&second).await.unwrap().email, "ada@example.com");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_ends_the_session_on_the_server() {
    let app = spawn_app(Backend::Sqlite).await;
    app.register("ada@example.com").await;
    let client = Client::connect(app.endpoint()).await.unwrap();
    client.login("ada@example.com", PASSWORD).await.unwrap();
    let token = client.access_token().await.unwrap().unwrap();
    assert!(app.current_user(&token).await.is_ok());

    client.logout().await.unwrap();

    assert_eq!(client.access_token().await.unwrap(), None);
    let revoked = app.current_user(&token).await.unwrap_err();
    assert_eq!(
        revoked.code(),
        Code::Unauthenticated,
        "the server forgot the session: {revoked:?}"
    );
    let after = client
        .identity_queries()
        .get_current_user(identity::GetCurrentUserRequest {})
        .await
        .unwrap_err();
    assert_eq!(after.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_carries_bad_request_field_violations() {
    let app = spawn_app(Backend::Sqlite).await;
    let client = Client::connect(app.endpoint()).await.unwrap();
    let status = client
        .identity_commands()
        .register(identity::RegisterRequest {
            email: "not an email".to_owned(),
            password: "short".to_owned(),
            display_name: "Ada".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad_request = status.get_details_bad_request().expect("a BadRequest detail");
    let fields: Vec<&str> = bad_request.field_violations.iter().map(|v| v.field.as_str()).collect();
    assert!(fields.contains(&"email") && fields.contains(&"password"), "{fields:?}");
}
