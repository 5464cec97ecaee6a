//! Access ends at once when it ends: logout, a revoked session, a password
//! change, a demotion and a deleted account each take effect on the very
//! next call, although keel remembers verified tokens. On PostgreSQL and
//! Redis the same holds for a second keel process that used the token
//! before: it never answers from what it remembers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keel_proto::identity as pb;
use keel_testkit::{Backend, PASSWORD, TestApp, authed, backend_tests, spawn_app_with};
use tonic::Code;

fn refused(result: Result<pb::User, tonic::Status>) -> bool {
    result.is_err_and(|status| status.code() == Code::Unauthenticated)
}

async fn list_users(app: &TestApp, token: &str) -> Result<(), tonic::Status> {
    app.queries()
        .await
        .list_users(authed(pb::ListUsersRequest::default(), token))
        .await
        .map(|_| ())
}

backend_tests! {
    async fn every_way_access_ends_takes_effect_on_the_next_call(app: TestApp) {
        let (_, admin) = app.admin("root@example.com").await;

        // Logout.
        let (_, tokens) = app.signed_in("logout@example.com").await;
        app.current_user(&tokens.access_token).await.unwrap();
        app.commands()
            .await
            .logout(authed(pb::LogoutRequest {}, &tokens.access_token))
            .await
            .unwrap();
        assert!(refused(app.current_user(&tokens.access_token).await), "after logout");

        // A session revoked from another session of the same user.
        let (_, laptop) = app.signed_in("laptop@example.com").await;
        let phone = app.login("laptop@example.com").await;
        app.current_user(&laptop.access_token).await.unwrap();
        app.commands()
            .await
            .revoke_session(authed(pb::RevokeSessionRequest { id: laptop.session_id.clone() }, &phone.access_token))
            .await
            .unwrap();
        assert!(refused(app.current_user(&laptop.access_token).await), "after RevokeSession");
        app.current_user(&phone.access_token).await.unwrap();

        // A password change ends the other sessions.
        let (_, old) = app.signed_in("change@example.com").await;
        let current = app.login("change@example.com").await;
        app.current_user(&old.access_token).await.unwrap();
        app.commands()
            .await
            .change_password(authed(
                pb::ChangePasswordRequest {
                    current_password: PASSWORD.to_owned(),
                    new_password: "another long passphrase".to_owned(),
                },
                &current.access_token,
            ))
            .await
            .unwrap();
        assert!(refused(app.current_user(&old.access_token).await), "after ChangePassword");
        app.current_user(&current.access_token).await.unwrap();

        // A demotion: the same token keeps working, without the admin's rights.
        let (deputy, deputy_tokens) = app.signed_in("deputy@example.com").await;
        let promote = |role: pb::Role| pb::UpdateUserRequest {
            user: Some(pb::User {
                id: deputy.id.clone(),
                role: role as i32,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["role".to_owned()] }),
        };
        app.commands()
            .await
            .update_user(authed(promote(pb::Role::Admin), &admin.access_token))
            .await
            .unwrap();
        list_users(&app, &deputy_tokens.access_token).await.unwrap();
        app.commands()
            .await
            .update_user(authed(promote(pb::Role::User), &admin.access_token))
            .await
            .unwrap();
        let demoted = list_users(&app, &deputy_tokens.access_token).await.unwrap_err();
        assert_eq!(demoted.code(), Code::PermissionDenied, "after the demotion");

        // A deleted account.
        let (gone, gone_tokens) = app.signed_in("gone@example.com").await;
        app.current_user(&gone_tokens.access_token).await.unwrap();
        app.commands()
            .await
            .delete_user(authed(pb::DeleteUserRequest { id: gone.id.clone() }, &admin.access_token))
            .await
            .unwrap();
        assert!(refused(app.current_user(&gone_tokens.access_token).await), "after DeleteUser");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL) and Redis (KEEL_TEST_REDIS_URL); run with --include-ignored"]
async fn access_ended_on_one_process_ends_on_another_at_once() {
    let redis = keel_testkit::redis_url();
    let first = spawn_app_with(Backend::Postgres, move |config| {
        config.redis_url = Some(keel_server::config::Secret::new(redis));
    })
    .await;
    let second = keel_testkit::second_process(&first).await;
    let (_, admin) = first.admin("root@example.com").await;

    // Logout on the first process; the second had verified the token.
    let (_, tokens) = first.signed_in("ada@example.com").await;
    second.current_user(&tokens.access_token).await.unwrap();
    first
        .commands()
        .await
        .logout(authed(pb::LogoutRequest {}, &tokens.access_token))
        .await
        .unwrap();
    assert!(
        refused(second.current_user(&tokens.access_token).await),
        "logout elsewhere"
    );

    // An account deleted through the second process, used on the first.
    let (gone, gone_tokens) = first.signed_in("gone@example.com").await;
    first.current_user(&gone_tokens.access_token).await.unwrap();
    second
        .commands()
        .await
        .delete_user(authed(
            pb::DeleteUserRequest { id: gone.id.clone() },
            &admin.access_token,
        ))
        .await
        .unwrap();
    assert!(
        refused(first.current_user(&gone_tokens.access_token).await),
        "deleted elsewhere"
    );
}
