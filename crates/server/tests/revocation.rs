//! Access ends at once when it ends: logout, a revoked session, a password
//! change, a demotion, a rename and a deleted account each take effect on the
//! very next call, although keel remembers verified tokens and (on SQLite,
//! and with Redis) active sessions. On PostgreSQL and Redis the same holds
//! for a second keel process that used the token before: it never answers
//! from what it remembers.

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

/// Every way access ends, acted through `acting` and checked on `checking`
/// (the same process, or another one), which used each token just before.
async fn every_way_access_ends(acting: &TestApp, checking: &TestApp) {
    let (_, admin) = acting.admin("root@example.com").await;

    // Logout.
    let (_, tokens) = acting.signed_in("logout@example.com").await;
    checking.current_user(&tokens.access_token).await.unwrap();
    acting
        .commands()
        .await
        .logout(authed(pb::LogoutRequest {}, &tokens.access_token))
        .await
        .unwrap();
    assert!(
        refused(checking.current_user(&tokens.access_token).await),
        "after logout"
    );

    // A session revoked from another session of the same user.
    let (_, laptop) = acting.signed_in("laptop@example.com").await;
    let phone = acting.login("laptop@example.com").await;
    checking.current_user(&laptop.access_token).await.unwrap();
    acting
        .commands()
        .await
        .revoke_session(authed(
            pb::RevokeSessionRequest {
                id: laptop.session_id.clone(),
            },
            &phone.access_token,
        ))
        .await
        .unwrap();
    assert!(
        refused(checking.current_user(&laptop.access_token).await),
        "after RevokeSession"
    );
    checking.current_user(&phone.access_token).await.unwrap();

    // A password change ends the other sessions.
    let (_, old) = acting.signed_in("change@example.com").await;
    let current = acting.login("change@example.com").await;
    checking.current_user(&old.access_token).await.unwrap();
    acting
        .commands()
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
    assert!(
        refused(checking.current_user(&old.access_token).await),
        "after ChangePassword"
    );
    checking.current_user(&current.access_token).await.unwrap();

    // A demotion: the same token keeps working, without the admin's rights.
    let (deputy, deputy_tokens) = acting.signed_in("deputy@example.com").await;
    let promote = |role: pb::Role| pb::UpdateUserRequest {
        user: Some(pb::User {
            id: deputy.id.clone(),
            role: role as i32,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["role".to_owned()],
        }),
    };
    acting
        .commands()
        .await
        .update_user(authed(promote(pb::Role::Admin), &admin.access_token))
        .await
        .unwrap();
    list_users(checking, &deputy_tokens.access_token).await.unwrap();
    acting
        .commands()
        .await
        .update_user(authed(promote(pb::Role::User), &admin.access_token))
        .await
        .unwrap();
    let demoted = list_users(checking, &deputy_tokens.access_token).await.unwrap_err();
    assert_eq!(demoted.code(), Code::PermissionDenied, "after the demotion");

    // A renamed user: GetCurrentUser never answers the old name.
    let (renamed, renamed_tokens) = acting.signed_in("renamed@example.com").await;
    checking.current_user(&renamed_tokens.access_token).await.unwrap();
    let get_user = || async {
        checking
            .queries()
            .await
            .get_user(authed(
                pb::GetUserRequest { id: renamed.id.clone() },
                &admin.access_token,
            ))
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap()
    };
    assert_eq!(get_user().await.display_name, renamed.display_name);
    acting
        .commands()
        .await
        .update_user(authed(
            pb::UpdateUserRequest {
                user: Some(pb::User {
                    id: renamed.id.clone(),
                    display_name: "Renamed".to_owned(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["display_name".to_owned()],
                }),
            },
            &renamed_tokens.access_token,
        ))
        .await
        .unwrap();
    let seen = checking.current_user(&renamed_tokens.access_token).await.unwrap();
    assert_eq!(seen.display_name, "Renamed", "after UpdateUser");
    assert_eq!(get_user().await.display_name, "Renamed", "GetUser after UpdateUser");

    // A deleted account.
    let (gone, gone_tokens) = acting.signed_in("gone@example.com").await;
    checking.current_user(&gone_tokens.access_token).await.unwrap();
    acting
        .commands()
        .await
        .delete_user(authed(
            pb::DeleteUserRequest { id: gone.id.clone() },
            &admin.access_token,
        ))
        .await
        .unwrap();
    assert!(
        refused(checking.current_user(&gone_tokens.access_token).await),
        "after DeleteUser"
    );
}

backend_tests! {
    async fn every_way_access_ends_takes_effect_on_the_next_call(app: TestApp) {
        every_way_access_ends(&app, &app).await;
    }

    async fn the_access_cache_answers_without_the_database_where_every_process_hears(app: TestApp) {
        use sea_orm::ConnectionTrait;
        let (_, tokens) = app.signed_in("ada@example.com").await;
        app.current_user(&tokens.access_token).await.unwrap();
        // Behind keel's back (no announcement): only a cache still answers.
        app.state.db.execute_unprepared("DELETE FROM sessions").await.unwrap();
        let answered = app.current_user(&tokens.access_token).await;
        match app.backend {
            // One process alone: the cache is on (and exact through keel).
            Backend::Sqlite => assert!(answered.is_ok(), "the cache was not used: {answered:?}"),
            // Several processes may share PostgreSQL unheard without Redis: off.
            Backend::Postgres => assert!(refused(answered), "a cache answered without Redis"),
        }
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
    // With Redis both remember sessions; every change reaches the other
    // before the call that made it answers.
    every_way_access_ends(&first, &second).await;
}
