//! The identity service over real gRPC: every flow and every security rule,
//! each written once and run on SQLite and PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use keel_proto::identity as pb;
use keel_testkit::{PASSWORD, TestApp, authed, backend_tests};
use tonic::Code;
use tonic_types::StatusExt;

fn code<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> Code {
    result.expect_err("the call should fail").code()
}

async fn login_with(app: &TestApp, email: &str, password: &str) -> Result<pb::LoginResponse, tonic::Status> {
    app.commands()
        .await
        .login(pb::LoginRequest {
            email: email.to_owned(),
            password: password.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn refresh(app: &TestApp, refresh_token: &str) -> Result<pb::AuthTokens, tonic::Status> {
    app.commands()
        .await
        .refresh_session(pb::RefreshSessionRequest {
            refresh_token: refresh_token.to_owned(),
        })
        .await
        .map(|response| response.into_inner().tokens.unwrap())
}

/// The same signing key as the app, with other claims settings.
fn token_service(app: &TestApp, audience: &str) -> keel_identity::tokens::TokenService {
    let keys = keel_identity::tokens::KeySet::load(&app.data_dir.path().join("auth-keys.json")).unwrap();
    keel_identity::tokens::TokenService::new(keys, "keel".into(), audience.into(), Duration::from_secs(900))
}

fn ids(user: &pb::User, tokens: &pb::AuthTokens) -> (uuid::Uuid, uuid::Uuid) {
    (user.id.parse().unwrap(), tokens.session_id.parse().unwrap())
}

backend_tests! {
    async fn register_login_and_read_yourself(app: TestApp) {
        let user = app.register("Ada@Example.com").await;
        assert_eq!(user.role, pb::Role::User as i32);
        assert_eq!(user.email, "Ada@Example.com");
        let tokens = app.login("ada@example.com").await;
        assert_eq!(tokens.token_type, "Bearer");
        let mut request = authed(pb::GetCurrentUserRequest {}, &tokens.access_token);
        request.metadata_mut().insert("x-request-id", "trace-me-42".parse().unwrap());
        let response = app.queries().await.get_current_user(request).await.unwrap();
        assert_eq!(response.metadata().get("x-request-id").unwrap(), "trace-me-42");
        assert_eq!(response.into_inner().user.unwrap().id, user.id);
    }

    async fn a_request_id_is_made_when_none_is_sent(app: TestApp) {
        let response = app.queries().await.get_jwks(pb::GetJwksRequest {}).await.unwrap();
        let id = response.metadata().get("x-request-id").unwrap().to_str().unwrap().to_owned();
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    }

    async fn emails_are_unique_case_insensitively(app: TestApp) {
        let original = app.register("grace@example.com").await;
        let register = |email: &str| pb::RegisterRequest {
            email: email.into(),
            password: "another passphrase entirely".into(),
            display_name: "Grace".into(),
        };
        let mut fresh_times = Vec::new();
        let mut taken_times = Vec::new();
        for attempt in 0..3 {
            let started = Instant::now();
            app.commands().await.register(register(&format!("fresh{attempt}@example.com"))).await.unwrap();
            fresh_times.push(started.elapsed());
            let started = Instant::now();
            // Answered like a new account ...
            let duplicate = app.commands().await.register(register("GRACE@example.COM")).await.unwrap().into_inner().user.unwrap();
            taken_times.push(started.elapsed());
            assert_ne!(duplicate.id, original.id);
            assert_eq!(duplicate.email, "GRACE@example.COM");
        }
        // ... but no second account: the original signs in, with its own password only.
        let signed_in = login_with(&app, "grace@example.com", PASSWORD).await.unwrap();
        assert_eq!(signed_in.user.unwrap().id, original.id);
        assert_eq!(code(login_with(&app, "grace@example.com", "another passphrase entirely").await), Code::Unauthenticated);
        // Both hash the password: a taken email does not answer faster.
        fresh_times.sort();
        taken_times.sort();
        let (fresh, taken) = (fresh_times[1], taken_times[1]);
        assert!(taken * 3 >= fresh, "taken email {taken:?} vs fresh email {fresh:?}");
    }

    async fn concurrent_registrations_of_one_email_all_answer_and_create_one_account(app: TestApp) {
        let register = || async {
            app.commands()
                .await
                .register(pb::RegisterRequest { email: "race@example.com".into(), password: PASSWORD.into(), display_name: "Race".into() })
                .await
                .map(|response| response.into_inner().user.unwrap().id)
        };
        let answers = futures::future::join_all((0..4).map(|_| register())).await;
        let ids: Vec<String> = answers.into_iter().map(Result::unwrap).collect();
        let account = login_with(&app, "race@example.com", PASSWORD).await.unwrap().user.unwrap().id;
        assert_eq!(ids.iter().filter(|id| **id == account).count(), 1, "{ids:?} vs {account}");
    }

    async fn register_answers_the_same_whether_the_email_is_taken_or_not(app: TestApp) {
        let (_, admin) = app.admin("root@example.com").await;
        let register = |password: &str| serde_json::json!({"email": "ada@example.com", "password": password, "displayName": "Ada"});
        let (first_status, first_headers, first) = rest(&app, "POST", "/v1/auth/register", None, register(PASSWORD)).await;
        let (second_status, second_headers, second) =
            rest(&app, "POST", "/v1/auth/register", None, register("another passphrase entirely")).await;
        assert_eq!(first_status, 201, "{first}");
        assert_eq!(second_status, first_status, "{second}");
        assert_eq!(header_names(&second_headers), header_names(&first_headers));
        assert_eq!(shape(&second), shape(&first));
        let (original, ghost) = (&first["data"]["user"], &second["data"]["user"]);
        for field in ["email", "displayName", "role"] {
            assert_eq!(ghost[field], original[field], "{field}");
        }
        // The wire User has no version; its timestamps are now.
        for field in ["createdAt", "updatedAt"] {
            let at: chrono::DateTime<chrono::Utc> = ghost[field].as_str().unwrap().parse().unwrap();
            assert!((chrono::Utc::now() - at).num_seconds().abs() < 60, "{field} {at}");
        }
        assert_ne!(ghost["id"], original["id"]);
        assert!(uuid::Uuid::parse_str(ghost["id"].as_str().unwrap()).is_ok());

        // The second answer's user does not exist; the first one does.
        let user_path = |user: &serde_json::Value| format!("/v1/users/{}", user["id"].as_str().unwrap());
        let (status, _, _) = rest(&app, "GET", &user_path(ghost), Some(&admin.access_token), serde_json::Value::Null).await;
        assert_eq!(status, 404);
        let (status, _, _) = rest(&app, "GET", &user_path(original), Some(&admin.access_token), serde_json::Value::Null).await;
        assert_eq!(status, 200);
        assert_eq!(login_with(&app, "ada@example.com", PASSWORD).await.unwrap().user.unwrap().id, original["id"].as_str().unwrap());

        // The owner is told, once; the welcome email went out once.
        let mail_file = app.data_dir.path().join("mail.jsonl");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mail = loop {
            let mail: Vec<serde_json::Value> = std::fs::read_to_string(&mail_file)
                .unwrap_or_default()
                .lines()
                .map(|line| serde_json::from_str(line).unwrap())
                .filter(|mail: &serde_json::Value| mail["to"] == "ada@example.com")
                .collect();
            if mail.len() >= 2 {
                break mail;
            }
            assert!(Instant::now() < deadline, "the owner got {} emails within 10 s: {mail:?}", mail.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let subjects: Vec<_> = mail.iter().map(|mail| mail["subject"].as_str().unwrap()).collect();
        assert_eq!(subjects.len(), 2, "{subjects:?}");
        assert!(subjects.contains(&"Welcome to Keel"), "{subjects:?}");
        assert!(subjects.contains(&"Someone tried to register with your address"), "{subjects:?}");
        let warning = mail.iter().find(|mail| mail["subject"] != "Welcome to Keel").unwrap();
        assert!(warning["text"].as_str().unwrap().contains("sign in"), "{warning}");
    }

    async fn invalid_input_names_every_field(app: TestApp) {
        let status = app
            .commands()
            .await
            .register(pb::RegisterRequest {
                email: "not-an-email".into(),
                password: "password1".into(),
                display_name: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let fields: Vec<_> = details
            .bad_request()
            .unwrap()
            .field_violations
            .iter()
            .map(|violation| violation.field.clone())
            .collect();
        assert_eq!(fields, ["email", "password", "display_name"]);
    }

    async fn calls_without_a_token_are_unauthenticated(app: TestApp) {
        let result = app.queries().await.get_current_user(pb::GetCurrentUserRequest {}).await;
        assert_eq!(code(result), Code::Unauthenticated);
        let result = app.queries().await.list_sessions(pb::ListSessionsRequest {}).await;
        assert_eq!(code(result), Code::Unauthenticated);
    }

    async fn an_expired_token_is_refused(app: TestApp) {
        let (user, tokens) = app.signed_in("expired@example.com").await;
        let (user_id, session_id) = ids(&user, &tokens);
        let two_hours_ago = chrono::Utc::now() - chrono::Duration::hours(2);
        let (expired, _) = app
            .state
            .identity
            .tokens()
            .issue_access(user_id, session_id, keel_kernel::Role::User, two_hours_ago)
            .unwrap();
        assert_eq!(code(app.current_user(&expired).await), Code::Unauthenticated);
        // The same claims, fresh, pass: the expiry is what was refused.
        let (fresh, _) = app
            .state
            .identity
            .tokens()
            .issue_access(user_id, session_id, keel_kernel::Role::User, chrono::Utc::now())
            .unwrap();
        assert!(app.current_user(&fresh).await.is_ok());
    }

    async fn a_token_for_another_audience_is_refused(app: TestApp) {
        let (user, tokens) = app.signed_in("aud@example.com").await;
        let (user_id, session_id) = ids(&user, &tokens);
        let now = chrono::Utc::now();
        let (other, _) = token_service(&app, "another-service")
            .issue_access(user_id, session_id, keel_kernel::Role::User, now)
            .unwrap();
        assert_eq!(code(app.current_user(&other).await), Code::Unauthenticated);
        let (same, _) = token_service(&app, "keel")
            .issue_access(user_id, session_id, keel_kernel::Role::User, now)
            .unwrap();
        assert!(app.current_user(&same).await.is_ok());
    }

    async fn an_unsigned_alg_none_token_is_refused(app: TestApp) {
        use base64::Engine;
        let (user, tokens) = app.signed_in("none@example.com").await;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let signed_claims = tokens.access_token.split('.').nth(1).unwrap().to_owned();
        let claims: serde_json::Value = serde_json::from_slice(&engine.decode(&signed_claims).unwrap()).unwrap();
        assert_eq!(claims["sub"], user.id);
        let kid = serde_json::from_slice::<serde_json::Value>(
            &engine.decode(tokens.access_token.split('.').next().unwrap()).unwrap(),
        )
        .unwrap()["kid"]
            .clone();
        let header = engine.encode(serde_json::json!({"alg": "none", "typ": "JWT", "kid": kid}).to_string());
        for forged in [format!("{header}.{signed_claims}."), format!("{header}.{signed_claims}")] {
            assert_eq!(code(app.current_user(&forged).await), Code::Unauthenticated);
        }
    }

    async fn a_token_signed_by_another_key_is_refused(app: TestApp) {
        let (user, tokens) = app.signed_in("forger@example.com").await;
        let (user_id, session_id) = ids(&user, &tokens);
        // Same kid as the app's key, different private key.
        let app_keys: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(app.data_dir.path().join("auth-keys.json")).unwrap()).unwrap();
        let mut other: serde_json::Value =
            serde_json::from_str(&keel_identity::tokens::KeySet::generate_file()).unwrap();
        other["active"] = app_keys["active"].clone();
        other["keys"][0]["kid"] = app_keys["active"].clone();
        let forger = keel_identity::tokens::TokenService::new(
            keel_identity::tokens::KeySet::parse(&other.to_string()).unwrap(),
            "keel".into(),
            "keel".into(),
            Duration::from_secs(900),
        );
        let (forged, _) = forger
            .issue_access(user_id, session_id, keel_kernel::Role::Admin, chrono::Utc::now())
            .unwrap();
        assert_eq!(code(app.current_user(&forged).await), Code::Unauthenticated);
    }

    async fn a_refresh_token_is_not_an_access_token(app: TestApp) {
        let (_, tokens) = app.signed_in("refresh-as-access@example.com").await;
        assert_eq!(code(app.current_user(&tokens.refresh_token).await), Code::Unauthenticated);
        assert!(app.current_user(&tokens.access_token).await.is_ok());
    }

    async fn redeeming_one_refresh_token_again_within_the_grace_window_returns_the_same_successor(app: TestApp) {
        let (_, first) = app.signed_in("tabs@example.com").await;
        let mut answers = Vec::new();
        for _ in 0..5 {
            answers.push(refresh(&app, &first.refresh_token).await.unwrap());
        }
        let successor = answers[0].refresh_token.clone();
        assert_ne!(successor, first.refresh_token);
        assert!(answers.iter().all(|tokens| tokens.refresh_token == successor), "the session forked");
        for tokens in &answers {
            assert_eq!(tokens.session_id, first.session_id);
            assert!(app.current_user(&tokens.access_token).await.is_ok());
        }
        // The one successor is live, and rotates as usual ...
        let next = refresh(&app, &successor).await.unwrap();
        assert_ne!(next.refresh_token, successor);
        // ... and a tab still holding the first token (or the successor)
        // follows the chain to that live token, never to a branch of its own.
        assert_eq!(refresh(&app, &first.refresh_token).await.unwrap().refresh_token, next.refresh_token);
        assert_eq!(refresh(&app, &successor).await.unwrap().refresh_token, next.refresh_token);
        assert!(refresh(&app, &next.refresh_token).await.is_ok());
    }

    async fn concurrent_redemptions_of_one_refresh_token_return_the_same_successor(app: TestApp) {
        let (_, first) = app.signed_in("racing-tabs@example.com").await;
        let answers = futures::future::join_all((0..5).map(|_| refresh(&app, &first.refresh_token))).await;
        let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
        let successor = answers[0].refresh_token.clone();
        assert_ne!(successor, first.refresh_token);
        assert!(
            answers.iter().all(|tokens| tokens.refresh_token == successor),
            "concurrent redemptions forked the session: {:?}",
            answers.iter().map(|tokens| &tokens.refresh_token).collect::<Vec<_>>()
        );
        assert!(refresh(&app, &successor).await.is_ok());
    }

    async fn logout_revokes_access_at_once(app: TestApp) {
        let (_, tokens) = app.signed_in("logout@example.com").await;
        assert!(app.current_user(&tokens.access_token).await.is_ok());
        app.commands()
            .await
            .logout(authed(pb::LogoutRequest {}, &tokens.access_token))
            .await
            .unwrap();
        assert_eq!(code(app.current_user(&tokens.access_token).await), Code::Unauthenticated);
        assert_eq!(code(refresh(&app, &tokens.refresh_token).await), Code::Unauthenticated);
    }

    async fn unknown_email_and_wrong_password_look_the_same(app: TestApp) {
        app.register("known@example.com").await;
        let mut unknown_times = Vec::new();
        let mut wrong_times = Vec::new();
        let mut answers = Vec::new();
        for attempt in 0..3 {
            let started = Instant::now();
            let unknown = login_with(&app, &format!("nobody{attempt}@example.com"), "some password here").await.unwrap_err();
            unknown_times.push(started.elapsed());
            let started = Instant::now();
            let wrong = login_with(&app, "known@example.com", "some password here").await.unwrap_err();
            wrong_times.push(started.elapsed());
            answers.push((unknown.code(), unknown.message().to_owned(), unknown.details().to_vec()));
            answers.push((wrong.code(), wrong.message().to_owned(), wrong.details().to_vec()));
        }
        assert!(answers.windows(2).all(|pair| pair[0] == pair[1]), "{answers:?}");
        assert_eq!(answers[0].0, Code::Unauthenticated);
        // Without the dummy hash an unknown email answers in about a
        // millisecond; with it, both cost one Argon2id verification.
        unknown_times.sort();
        wrong_times.sort();
        let (unknown, wrong) = (unknown_times[1], wrong_times[1]);
        assert!(unknown * 3 >= wrong, "unknown email {unknown:?} vs wrong password {wrong:?}");
    }

    async fn repeated_failures_are_throttled_with_a_retry_delay(app: TestApp) {
        app.register("throttled@example.com").await;
        let mut refused = None;
        for _ in 0..15 {
            match login_with(&app, "throttled@example.com", "not the password").await {
                Err(status) if status.code() == Code::ResourceExhausted => {
                    refused = Some(status);
                    break;
                }
                Err(status) => assert_eq!(status.code(), Code::Unauthenticated),
                Ok(_) => panic!("a wrong password logged in"),
            }
        }
        let status = refused.expect("login was never throttled");
        let retry = status.get_error_details().retry_info().unwrap().retry_delay.unwrap();
        assert!(retry > Duration::ZERO, "{retry:?}");
        assert!(status.metadata().get("retry-after").is_some());
        // The right password is refused too from the guessing address ...
        assert_eq!(code(login_with(&app, "throttled@example.com", PASSWORD).await), Code::ResourceExhausted);
        // ... and accepted from another one: the guesser did not lock the account.
        let elsewhere = channel_from(&app, std::net::Ipv4Addr::new(127, 0, 0, 2).into()).await;
        assert!(login_from(&elsewhere, "throttled@example.com", PASSWORD).await.is_ok());
    }

    async fn an_address_guessing_many_accounts_is_refused(app: TestApp) {
        app.register("spray@example.com").await;
        let sprayer = channel_from(&app, std::net::Ipv4Addr::new(127, 0, 0, 3).into()).await;
        let mut refused = None;
        // One guess per account: only the per-address limit (30 at once) applies.
        for attempt in 0..45 {
            match login_from(&sprayer, &format!("someone{attempt}@example.com"), "not the password").await {
                Err(status) if status.code() == Code::ResourceExhausted => {
                    refused = Some((attempt, status));
                    break;
                }
                Err(status) => assert_eq!(status.code(), Code::Unauthenticated),
                Ok(_) => panic!("an unknown email logged in"),
            }
        }
        let (attempt, status) = refused.expect("the address was never throttled");
        assert!(attempt >= 30, "refused after {attempt} attempts");
        assert!(status.get_error_details().retry_info().is_some());
        // Refused whatever the account, the right password too.
        assert_eq!(code(login_from(&sprayer, "spray@example.com", PASSWORD).await), Code::ResourceExhausted);
        assert!(login_with(&app, "spray@example.com", PASSWORD).await.is_ok());
    }

    async fn another_users_id_is_not_found(app: TestApp) {
        let (_, alice) = app.signed_in("alice@example.com").await;
        let bob = app.register("bob@example.com").await;
        let queries = &mut app.queries().await;
        let other = queries.get_user(authed(pb::GetUserRequest { id: bob.id.clone() }, &alice.access_token)).await;
        let missing = queries
            .get_user(authed(pb::GetUserRequest { id: uuid::Uuid::now_v7().to_string() }, &alice.access_token))
            .await;
        let (other, missing) = (other.unwrap_err(), missing.unwrap_err());
        assert_eq!(other.code(), Code::NotFound);
        assert_eq!(other.message(), missing.message());
        let (_, admin) = app.admin("root@example.com").await;
        let seen = queries.get_user(authed(pb::GetUserRequest { id: bob.id.clone() }, &admin.access_token)).await.unwrap();
        assert_eq!(seen.into_inner().user.unwrap().email, "bob@example.com");
    }

    async fn only_admins_change_roles_and_the_change_is_immediate(app: TestApp) {
        let (user, tokens) = app.signed_in("climber@example.com").await;
        let promote = |token: &str, id: &str| {
            authed(
                pb::UpdateUserRequest {
                    user: Some(pb::User { id: id.to_owned(), role: pb::Role::Admin as i32, ..Default::default() }),
                    update_mask: Some(prost_types::FieldMask { paths: vec!["role".into()] }),
                },
                token,
            )
        };
        let denied = app.commands().await.update_user(promote(&tokens.access_token, &user.id)).await;
        assert_eq!(code(denied), Code::PermissionDenied);

        let (_, admin) = app.admin("boss@example.com").await;
        let promoted = app.commands().await.update_user(promote(&admin.access_token, &user.id)).await.unwrap();
        assert_eq!(promoted.into_inner().user.unwrap().role, pb::Role::Admin as i32);
        // The old access token (role "user" inside) now acts as admin: the role is read from the database.
        let listed = app
            .queries()
            .await
            .list_users(authed(pb::ListUsersRequest::default(), &tokens.access_token))
            .await;
        assert!(listed.is_ok());
    }

    async fn update_user_honours_the_field_mask(app: TestApp) {
        let (user, tokens) = app.signed_in("masked@example.com").await;
        let request = |paths: Vec<&str>| {
            authed(
                pb::UpdateUserRequest {
                    user: Some(pb::User {
                        id: user.id.clone(),
                        email: "changed@example.com".into(),
                        display_name: "New Name".into(),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths: paths.into_iter().map(str::to_owned).collect() }),
                },
                &tokens.access_token,
            )
        };
        let updated = app.commands().await.update_user(request(vec!["display_name"])).await.unwrap().into_inner().user.unwrap();
        assert_eq!(updated.display_name, "New Name");
        assert_eq!(updated.email, "masked@example.com");
        assert_eq!(updated.id, user.id);
        assert_eq!(updated.created_at, user.created_at);
        for path in ["id", "created_at", "password", "nope"] {
            let refused = app.commands().await.update_user(request(vec![path])).await;
            assert_eq!(code(refused), Code::InvalidArgument, "{path}");
        }
        let bob = app.register("bob2@example.com").await;
        let mut someone_else = request(vec!["display_name"]);
        someone_else.get_mut().user.as_mut().unwrap().id = bob.id;
        assert_eq!(code(app.commands().await.update_user(someone_else).await), Code::NotFound);
    }

    async fn change_password_ends_every_other_session(app: TestApp) {
        let (_, here) = app.signed_in("mover@example.com").await;
        let elsewhere = app.login("mover@example.com").await;
        app.commands()
            .await
            .change_password(authed(
                pb::ChangePasswordRequest {
                    current_password: PASSWORD.into(),
                    new_password: "a brand new passphrase".into(),
                },
                &here.access_token,
            ))
            .await
            .unwrap();
        assert!(app.current_user(&here.access_token).await.is_ok());
        assert_eq!(code(app.current_user(&elsewhere.access_token).await), Code::Unauthenticated);
        assert_eq!(code(login_with(&app, "mover@example.com", PASSWORD).await), Code::Unauthenticated);
        assert!(login_with(&app, "mover@example.com", "a brand new passphrase").await.is_ok());
        let wrong_current = app
            .commands()
            .await
            .change_password(authed(
                pb::ChangePasswordRequest { current_password: "not it at all".into(), new_password: "another passphrase".into() },
                &here.access_token,
            ))
            .await;
        assert_eq!(code(wrong_current), Code::InvalidArgument);
    }

    async fn sessions_are_listed_and_revoked_by_their_owner_only(app: TestApp) {
        let (_, phone) = app.signed_in("owner@example.com").await;
        let laptop = app.login("owner@example.com").await;
        let sessions = app
            .queries()
            .await
            .list_sessions(authed(pb::ListSessionsRequest {}, &phone.access_token))
            .await
            .unwrap()
            .into_inner()
            .sessions;
        assert_eq!(sessions.len(), 2);
        assert_eq!(sessions.iter().filter(|session| session.current).count(), 1);
        assert!(sessions.iter().any(|session| session.current && session.id == phone.session_id));

        let (_, stranger) = app.signed_in("stranger@example.com").await;
        let foreign = app
            .commands()
            .await
            .revoke_session(authed(pb::RevokeSessionRequest { id: laptop.session_id.clone() }, &stranger.access_token))
            .await;
        assert_eq!(code(foreign), Code::NotFound);
        assert!(app.current_user(&laptop.access_token).await.is_ok());

        app.commands()
            .await
            .revoke_session(authed(pb::RevokeSessionRequest { id: laptop.session_id.clone() }, &phone.access_token))
            .await
            .unwrap();
        assert_eq!(code(app.current_user(&laptop.access_token).await), Code::Unauthenticated);
        assert!(app.current_user(&phone.access_token).await.is_ok());
    }

    async fn admins_create_list_and_delete_users(app: TestApp) {
        let (_, admin) = app.admin("admin@example.com").await;
        let (_, user) = app.signed_in("plain@example.com").await;
        let create = |token: &str, email: &str| {
            authed(
                pb::CreateUserRequest {
                    email: email.into(),
                    password: PASSWORD.into(),
                    display_name: "Mod".into(),
                    role: pb::Role::Moderator as i32,
                },
                token,
            )
        };
        assert_eq!(code(app.commands().await.create_user(create(&user.access_token, "x@example.com")).await), Code::PermissionDenied);
        let created = app.commands().await.create_user(create(&admin.access_token, "mod@example.com")).await.unwrap().into_inner().user.unwrap();
        assert_eq!(created.role, pb::Role::Moderator as i32);

        let listed = app.queries().await.list_users(authed(pb::ListUsersRequest::default(), &user.access_token)).await;
        assert_eq!(code(listed), Code::PermissionDenied);

        let victim_tokens = app.login("mod@example.com").await;
        let delete = |token: &str, id: &str| authed(pb::DeleteUserRequest { id: id.into() }, token);
        assert_eq!(code(app.commands().await.delete_user(delete(&user.access_token, &created.id)).await), Code::PermissionDenied);
        app.commands().await.delete_user(delete(&admin.access_token, &created.id)).await.unwrap();
        assert_eq!(code(app.current_user(&victim_tokens.access_token).await), Code::Unauthenticated);
        assert_eq!(code(app.commands().await.delete_user(delete(&admin.access_token, &created.id)).await), Code::NotFound);
    }

    async fn list_users_pages_stay_correct_while_rows_are_inserted(app: TestApp) {
        let (_, admin) = app.admin("pager@example.com").await;
        for index in 0..24 {
            keel_identity::admin::create_user(&app.state.bus, &format!("user{index:02}@example.com"), PASSWORD, None, keel_kernel::Role::User)
                .await
                .unwrap();
        }
        let list = |page_token: String, order_by: &str, query: &str| {
            authed(
                pb::ListUsersRequest { page_size: 10, page_token, query: query.into(), order_by: order_by.into() },
                &admin.access_token,
            )
        };
        for order_by in ["created_at", "created_at desc", "email", "email desc"] {
            let mut seen = Vec::new();
            let mut token = String::new();
            let mut pages = 0;
            loop {
                let page = app.queries().await.list_users(list(token, order_by, "")).await.unwrap().into_inner();
                assert!(page.users.len() <= 10);
                seen.extend(page.users.iter().map(|user| user.email.clone()));
                pages += 1;
                if pages == 1 {
                    // Inserted behind the cursor (or ahead, by email): never repeated, never shifting.
                    keel_identity::admin::create_user(&app.state.bus, &format!("late-{}@example.com", order_by.replace(' ', "-")), PASSWORD, None, keel_kernel::Role::User)
                        .await
                        .unwrap();
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            let mut unique = seen.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), seen.len(), "{order_by}: a row was repeated");
            let mut expected = seen.clone();
            match order_by {
                "email" => expected.sort_by_key(|email| email.to_lowercase()),
                "email desc" => expected.sort_by_key(|email| std::cmp::Reverse(email.to_lowercase())),
                _ => {}
            }
            assert_eq!(seen, expected, "{order_by}: out of order");
            assert!(seen.len() >= 25, "{order_by}: {} rows", seen.len());
        }

        let page = app.queries().await.list_users(list(String::new(), "email", "USER1")).await.unwrap().into_inner();
        let emails: Vec<_> = page.users.iter().map(|user| user.email.as_str()).collect();
        assert_eq!(emails, (10..20).map(|index| format!("user{index}@example.com")).collect::<Vec<_>>());
        assert!(page.next_page_token.is_empty());

        let first = app.queries().await.list_users(list(String::new(), "email", "")).await.unwrap().into_inner();
        let reused = app.queries().await.list_users(list(first.next_page_token.clone(), "created_at", "")).await;
        assert_eq!(code(reused), Code::InvalidArgument);
        let forged = app.queries().await.list_users(list("bm90IGEgdG9rZW4".into(), "email", "")).await;
        assert_eq!(code(forged), Code::InvalidArgument);
        let bad_order = app.queries().await.list_users(list(String::new(), "password", "")).await;
        assert_eq!(code(bad_order), Code::InvalidArgument);

        let mut huge = list(String::new(), "", "");
        huge.get_mut().page_size = 100_000;
        let all = app.queries().await.list_users(huge).await.unwrap().into_inner();
        assert!(all.users.len() > 25 && all.users.len() <= 100);
    }

    async fn jwks_verifies_the_access_tokens(app: TestApp) {
        let (user, tokens) = app.signed_in("jwks@example.com").await;
        let keys = app.queries().await.get_jwks(pb::GetJwksRequest {}).await.unwrap().into_inner().keys;
        assert_eq!(keys.len(), 1);
        let key = &keys[0];
        assert_eq!((key.kty.as_str(), key.crv.as_str(), key.alg.as_str()), ("OKP", "Ed25519", "EdDSA"));
        let header = jsonwebtoken::decode_header(&tokens.access_token).unwrap();
        assert_eq!(header.kid.as_deref(), Some(key.kid.as_str()));
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        validation.set_audience(&["keel"]);
        validation.set_issuer(&["keel"]);
        let claims = jsonwebtoken::decode::<serde_json::Value>(
            &tokens.access_token,
            &jsonwebtoken::DecodingKey::from_ed_components(&key.x).unwrap(),
            &validation,
        )
        .unwrap()
        .claims;
        assert_eq!(claims["sub"], user.id);
        assert_eq!(claims["sid"], tokens.session_id);
        assert_eq!(claims["role"], "user");
        assert_eq!(claims["typ"], "access");
        assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 900);
    }

    async fn an_oversized_message_is_resource_exhausted(app: TestApp) {
        let result = app
            .commands()
            .await
            .register(pb::RegisterRequest {
                email: "big@example.com".into(),
                password: PASSWORD.into(),
                display_name: "x".repeat(5 * 1024 * 1024),
            })
            .await;
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        // Just under the limit is read, and refused for its content instead.
        let result = app
            .commands()
            .await
            .register(pb::RegisterRequest {
                email: "big@example.com".into(),
                password: PASSWORD.into(),
                display_name: "x".repeat(3 * 1024 * 1024),
            })
            .await;
        assert_eq!(code(result), Code::InvalidArgument);
    }

    async fn common_passwords_are_refused(app: TestApp) {
        let result = app
            .commands()
            .await
            .register(pb::RegisterRequest { email: "weak@example.com".into(), password: "Password123".into(), display_name: "Weak".into() })
            .await;
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("common"), "{}", status.message());
    }
}

/// Reuse after the grace window: the session ends, for every token of it.
mod refresh_reuse {
    use super::*;

    async fn reuse_revokes_the_session(app: TestApp) {
        let (_, first) = app.signed_in("replay@example.com").await;
        let rotated = refresh(&app, &first.refresh_token).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let replay = refresh(&app, &first.refresh_token).await.unwrap_err();
        assert_eq!(replay.code(), Code::Unauthenticated);
        assert!(replay.message().contains("revoked"), "{}", replay.message());
        assert_eq!(code(refresh(&app, &rotated.refresh_token).await), Code::Unauthenticated);
        assert_eq!(
            code(app.current_user(&rotated.access_token).await),
            Code::Unauthenticated
        );
        assert_eq!(code(app.current_user(&first.access_token).await), Code::Unauthenticated);
    }

    /// One successor however often the first token is redeemed in the
    /// window; once the window has passed, redeeming it again ends the
    /// session, the successor with it.
    async fn the_successor_chain_ends_with_the_grace_window(app: TestApp) {
        let (_, first) = app.signed_in("window@example.com").await;
        let successors: Vec<_> = futures::future::join_all((0..5).map(|_| refresh(&app, &first.refresh_token)))
            .await
            .into_iter()
            .map(|tokens| tokens.unwrap().refresh_token)
            .collect();
        assert!(successors.iter().all(|token| *token == successors[0]), "{successors:?}");
        let live = refresh(&app, &successors[0]).await.unwrap();
        // Redeemed again until the window has passed: the live token each
        // time, then the end of the session.
        let deadline = Instant::now() + Duration::from_secs(10);
        let replay = loop {
            match refresh(&app, &first.refresh_token).await {
                Ok(tokens) => assert_eq!(tokens.refresh_token, live.refresh_token, "a second branch"),
                Err(status) => break status,
            }
            assert!(Instant::now() < deadline, "reuse was never detected");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(replay.code(), Code::Unauthenticated);
        assert!(replay.message().contains("revoked"), "{}", replay.message());
        assert_eq!(code(refresh(&app, &live.refresh_token).await), Code::Unauthenticated);
        assert_eq!(code(app.current_user(&live.access_token).await), Code::Unauthenticated);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let app =
            keel_testkit::spawn_app_with(keel_testkit::Backend::Sqlite, |config| config.refresh_grace_seconds = 1)
                .await;
        reuse_revokes_the_session(app).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chain_sqlite() {
        let app =
            keel_testkit::spawn_app_with(keel_testkit::Backend::Sqlite, |config| config.refresh_grace_seconds = 1)
                .await;
        the_successor_chain_ends_with_the_grace_window(app).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
    async fn chain_postgres() {
        let app = keel_testkit::spawn_app_with(keel_testkit::Backend::Postgres, |config| {
            config.refresh_grace_seconds = 1
        })
        .await;
        the_successor_chain_ends_with_the_grace_window(app).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
    async fn postgres() {
        let app = keel_testkit::spawn_app_with(keel_testkit::Backend::Postgres, |config| {
            config.refresh_grace_seconds = 1
        })
        .await;
        reuse_revokes_the_session(app).await;
    }
}

/// One REST call to the app: status, headers and the JSON body.
async fn rest(
    app: &TestApp,
    method: &str,
    path: &str,
    access_token: Option<&str>,
    body: serde_json::Value,
) -> (http::StatusCode, http::HeaderMap, serde_json::Value) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", app.endpoint()))
        .header("content-type", "application/json");
    if let Some(token) = access_token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let response = client.request(request.body(body.into()).unwrap()).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (parts.status, parts.headers, json)
}

/// The header names of a response, but those that differ on every call.
fn header_names(headers: &http::HeaderMap) -> std::collections::BTreeSet<String> {
    headers
        .keys()
        .map(|name| name.as_str().to_owned())
        .filter(|name| !matches!(name.as_str(), "x-request-id" | "date"))
        .collect()
}

/// A JSON value with every leaf replaced by its type: what two answers
/// share when their values differ.
fn shape(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(object) => Value::Object(object.iter().map(|(key, item)| (key.clone(), shape(item))).collect()),
        Value::Array(items) => Value::Array(items.iter().map(shape).collect()),
        Value::String(_) => "string".into(),
        Value::Number(_) => "number".into(),
        Value::Bool(_) => "bool".into(),
        Value::Null => Value::Null,
    }
}

/// A channel whose connections come from `source` (127.0.0.2, ...: on Linux
/// all of 127/8 is loopback), so the server sees another client address.
async fn channel_from(app: &TestApp, source: std::net::IpAddr) -> tonic::transport::Channel {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_local_address(Some(source));
    connector.set_nodelay(true);
    tonic::transport::Endpoint::from_shared(app.endpoint())
        .unwrap()
        .connect_with_connector(connector)
        .await
        .unwrap()
}

async fn login_from(
    channel: &tonic::transport::Channel,
    email: &str,
    password: &str,
) -> Result<pb::LoginResponse, tonic::Status> {
    pb::identity_command_service_client::IdentityCommandServiceClient::new(channel.clone())
        .login(pb::LoginRequest {
            email: email.to_owned(),
            password: password.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Strangers guessing one account's password from many addresses: each
/// address is refused after its own few guesses, the account as a whole is
/// only slowed, and its owner signs in throughout.
mod lockout {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    const ATTACKERS: u8 = 4;
    const GUESSES: usize = 1_000;
    const ROUNDS: usize = 10;
    const PER_ACCOUNT_ADDRESS: u32 = 10;

    fn configure(config: &mut keel_server::Config) {
        config.login_burst_per_account_address = PER_ACCOUNT_ADDRESS;
        // The per-account slowdown, shrunk: the test measures refusals, not delays.
        config.login_account_burst = 5;
        config.login_account_interval_ms = 10;
        config.login_account_max_delay_ms = 50;
    }

    /// `count` wrong passwords from `channel`, one after another: how many
    /// were verified (answered UNAUTHENTICATED, not RESOURCE_EXHAUSTED).
    async fn guess(channel: tonic::transport::Channel, count: usize) -> usize {
        let mut verified = 0;
        for attempt in 0..count {
            match login_from(&channel, "victim@example.com", &format!("guess number {attempt}")).await {
                Err(status) if status.code() == Code::Unauthenticated => verified += 1,
                Err(status) if status.code() == Code::ResourceExhausted => {
                    assert!(
                        status.get_error_details().retry_info().is_some(),
                        "429 without RetryInfo"
                    );
                }
                other => panic!("a guess answered {other:?}"),
            }
        }
        verified
    }

    async fn strangers_cannot_lock_an_account(app: TestApp) {
        app.register("victim@example.com").await;
        let started = Instant::now();
        let mut attackers = Vec::new();
        for index in 0..ATTACKERS {
            attackers.push(channel_from(&app, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + index))).await);
        }
        let per_round = GUESSES / ROUNDS / usize::from(ATTACKERS);
        let mut verified = 0;
        let mut owner_logins = 0;
        for round in 0..ROUNDS {
            // The owner, from an address of their own, at the same time as
            // this round of guesses, and between rounds.
            let owner = channel_from(&app, IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1 + round as u8))).await;
            let guesses = futures::future::join_all(attackers.iter().map(|channel| guess(channel.clone(), per_round)));
            let (counts, owner_login) = tokio::join!(guesses, login_from(&owner, "victim@example.com", PASSWORD));
            verified += counts.iter().sum::<usize>();
            let owner_login =
                owner_login.unwrap_or_else(|status| panic!("round {round}: the owner was refused: {status:?}"));
            assert_eq!(owner_login.user.unwrap().email, "victim@example.com");
            owner_logins += 1;
        }
        let elapsed = started.elapsed();
        eprintln!(
            "lockout: {verified} of {GUESSES} guesses from {ATTACKERS} addresses were verified in {elapsed:?}; \
             the owner signed in {owner_logins} of {ROUNDS} times during the attack"
        );
        // Each address gets its burst for this account, and one more per
        // minute after it; everything else was refused before verifying.
        let refills = elapsed.as_secs() as usize / 60 + 1;
        let bound = usize::from(ATTACKERS) * (PER_ACCOUNT_ADDRESS as usize + refills);
        assert!(verified <= bound, "{verified} guesses verified, more than {bound}");
        assert!(
            verified >= usize::from(ATTACKERS) * PER_ACCOUNT_ADDRESS as usize,
            "{verified}"
        );
        assert_eq!(owner_logins, ROUNDS);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        strangers_cannot_lock_an_account(keel_testkit::spawn_app_with(keel_testkit::Backend::Sqlite, configure).await)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
    async fn postgres() {
        strangers_cannot_lock_an_account(
            keel_testkit::spawn_app_with(keel_testkit::Backend::Postgres, configure).await,
        )
        .await;
    }
}
