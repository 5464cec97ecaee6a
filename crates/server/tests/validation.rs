//! The field rules written in the contracts (`google.api.field_behavior`,
//! `buf.validate`) hold on every protocol, after authentication and after
//! decompression, and the OpenAPI document states them. Each rule tested
//! here is one the domain types do not check themselves, so the test fails
//! without the rule.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel_proto::identity as pb;
use keel_testkit::{Backend, TestApp, authed, spawn_app};
use serde_json::Value;
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic_types::StatusExt;

async fn rest(app: &TestApp, method: &str, path: &str, bearer: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", app.endpoint()));
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let body = Full::new(Bytes::from(body.unwrap_or_default().to_owned()));
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client.request(request.body(body).unwrap()).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// The field violations of a REST error body: (field, description).
fn rest_violations(body: &Value) -> Vec<(String, String)> {
    body["error"]["details"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|detail| detail["@type"] == "type.googleapis.com/google.rpc.BadRequest")
        .flat_map(|detail| detail["fieldViolations"].as_array().cloned().unwrap_or_default())
        .map(|violation| {
            (
                violation["field"].as_str().unwrap().to_owned(),
                violation["description"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn grpc_violations(status: &tonic::Status) -> Vec<(String, String)> {
    status
        .get_error_details()
        .bad_request()
        .map(|bad| {
            bad.field_violations
                .iter()
                .map(|violation| (violation.field.clone(), violation.description.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// The simple (unhyphenated) form of a UUID: the id parser accepts it, the
/// contract's `string.uuid` rule does not.
fn simple_form(id: &str) -> String {
    id.replace('-', "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uuid_rule_holds_over_rest_grpc_and_compressed_grpc() {
    let app = spawn_app(Backend::Sqlite).await;
    let (user, tokens) = app.signed_in("ada@example.com").await;
    let unhyphenated = simple_form(&user.id);
    let expected = vec![(
        "id".to_owned(),
        "must be a UUID (8-4-4-4-12 hexadecimal digits)".to_owned(),
    )];

    // The well-formed id is the caller's own: without the rule the call succeeds.
    let (status, _) = rest(
        &app,
        "GET",
        &format!("/v1/users/{}", user.id),
        Some(&tokens.access_token),
        None,
    )
    .await;
    assert_eq!(status, 200);

    let (status, body) = rest(
        &app,
        "GET",
        &format!("/v1/users/{unhyphenated}"),
        Some(&tokens.access_token),
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "INVALID_ARGUMENT");
    assert_eq!(rest_violations(&body), expected);

    let refused = app
        .queries()
        .await
        .get_user(authed(
            pb::GetUserRequest {
                id: unhyphenated.clone(),
            },
            &tokens.access_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(grpc_violations(&refused), expected);

    // A gzip-compressed request is judged on its decompressed message.
    for encoding in [CompressionEncoding::Gzip, CompressionEncoding::Zstd] {
        let refused = app
            .queries()
            .await
            .send_compressed(encoding)
            .get_user(authed(
                pb::GetUserRequest {
                    id: unhyphenated.clone(),
                },
                &tokens.access_token,
            ))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{encoding:?}");
        assert_eq!(grpc_violations(&refused), expected, "{encoding:?}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_checked_after_authentication() {
    let app = spawn_app(Backend::Sqlite).await;
    let (status, body) = rest(&app, "GET", "/v1/users/not-a-uuid", None, None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = rest(&app, "POST", "/v1/users", None, Some("{}")).await;
    assert_eq!(status, 401, "{body}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_display_name_length_counts_what_was_sent() {
    // The domain trims before it counts; the contract's `max_len` counts the
    // value as sent, which is what the OpenAPI `maxLength` promises.
    let app = spawn_app(Backend::Sqlite).await;
    let padded = format!("{}{}", " ".repeat(10), "A".repeat(95));
    let body = serde_json::json!({
        "email": "padded@example.com",
        "password": "correct horse battery",
        "displayName": padded,
    })
    .to_string();
    let (status, body) = rest(&app, "POST", "/v1/auth/register", None, Some(&body)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        rest_violations(&body),
        [("display_name".to_owned(), "must be at most 100 characters".to_owned())]
    );
    let refused = app
        .commands()
        .await
        .register(pb::RegisterRequest {
            email: "padded@example.com".into(),
            password: "correct horse battery".into(),
            display_name: format!("{}{}", " ".repeat(10), "A".repeat(95)),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(grpc_violations(&refused)[0].0, "display_name");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internationalised_email_domains_are_still_accepted() {
    let app = spawn_app(Backend::Sqlite).await;
    let registered = app
        .commands()
        .await
        .register(pb::RegisterRequest {
            email: "ada@b\u{fc}cher.example".into(),
            password: "correct horse battery".into(),
            display_name: "Ada".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(registered.user.unwrap().email, "ada@xn--bcher-kva.example");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_states_the_rules() {
    let app = spawn_app(Backend::Sqlite).await;
    let (status, document) = rest(&app, "GET", "/openapi.json", None, None).await;
    assert_eq!(status, 200);
    let schema = |name: &str| document["components"]["schemas"][name].clone();
    let property = |schema: &Value, name: &str| {
        let property = &schema["properties"][name];
        property["allOf"][0]
            .as_object()
            .map_or_else(|| property.clone(), |inner| Value::Object(inner.clone()))
    };

    let register = schema("keel.identity.v1.RegisterRequest");
    assert_eq!(
        register["required"],
        serde_json::json!(["email", "password", "displayName"])
    );
    assert_eq!(register["additionalProperties"], false);
    assert_eq!(property(&register, "email")["format"], "email");
    assert_eq!(property(&register, "email")["maxLength"], 254);
    assert_eq!(property(&register, "password")["minLength"], 8);
    assert_eq!(property(&register, "password")["maxLength"], 128);
    assert_eq!(property(&register, "displayName")["minLength"], 1);
    assert!(property(&register, "displayName")["pattern"].is_string());

    let login = schema("keel.identity.v1.LoginRequest");
    assert_eq!(property(&login, "password")["minLength"], 1);
    assert!(property(&login, "password").get("maxLength").is_none());

    let paths = &document["paths"];
    let get_user = &paths["/v1/users/{id}"]["get"];
    assert_eq!(get_user["parameters"][0]["name"], "id");
    assert_eq!(get_user["parameters"][0]["schema"]["format"], "uuid");
    let delete_user = &paths["/v1/users/{id}"]["delete"];
    assert_eq!(delete_user["parameters"][0]["name"], "id");
    let list_users = paths["/v1/users"]["get"]["parameters"].as_array().unwrap();
    let page_size = list_users
        .iter()
        .find(|parameter| parameter["name"] == "page_size")
        .unwrap();
    assert_eq!(page_size["schema"]["minimum"], 0);
    let create_user = &paths["/v1/users"]["post"]["requestBody"];
    assert_eq!(create_user["required"], true);

    // The path sets `id`: the body of ReplayDeadLetter neither lists nor needs it.
    let replay = paths
        .as_object()
        .unwrap()
        .iter()
        .find(|(path, _)| path.starts_with("/v1/dead-letters/"))
        .map(|(_, item)| item["post"]["requestBody"].clone())
        .unwrap();
    assert_eq!(replay["required"], false);
    let body = &replay["content"]["application/json"]["schema"];
    assert!(body["properties"].get("id").is_none(), "{body}");
    assert!(body.get("required").is_none(), "{body}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_literal_path_is_its_own_operations_alone() {
    // `/v1/users/me` is GetCurrentUser's: PATCH and DELETE of `/v1/users/{id}`
    // do not reach it, and `Allow` says what OpenAPI documents for it.
    let app = spawn_app(Backend::Sqlite).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::builder()
        .method("PATCH")
        .uri(format!("{}/v1/users/me", app.endpoint()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "GET");
    app.stop().await;
}
