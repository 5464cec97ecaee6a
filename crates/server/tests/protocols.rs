//! One table of identity cases over every protocol against the real
//! server: native gRPC, grpc-web (binary through tonic-web's client, text
//! and JSON by hand), the Connect protocol (JSON and binary) and REST. Each
//! protocol runs the whole scenario on a fresh server; the normalised
//! results must agree.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel_edge::Upstream;
use keel_testkit::{Backend, TestApp, spawn_app};
use prost_reflect::prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Protocol {
    Grpc,
    GrpcWeb,
    GrpcWebText,
    GrpcWebJson,
    ConnectJson,
    ConnectProto,
    Rest,
}

/// A call: the gRPC method, its REST form, the request as proto3 JSON.
struct Call<'a> {
    rpc: &'a str,
    rest: (&'a str, String),
    request: Value,
    token: Option<&'a str>,
}

struct Client3 {
    protocol: Protocol,
    pool: DescriptorPool,
    upstream: Option<Upstream>,
    http: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    origin: String,
}

/// `Ok(data)` or `Err((code, details field names))`, as JSON, the same shape for every protocol.
type Outcome = Result<Value, (String, Vec<String>)>;

impl Client3 {
    async fn new(app: &TestApp, protocol: Protocol) -> Client3 {
        let origin = app.endpoint();
        let upstream = match protocol {
            Protocol::Grpc => Some(Upstream::new(app.channel().await)),
            Protocol::GrpcWeb => {
                let http =
                    Client::builder(TokioExecutor::new()).build_http::<tonic_web::GrpcWebCall<tonic::body::Body>>();
                let base = origin.clone();
                let web = tower::ServiceBuilder::new()
                    .map_request(move |mut request: http::Request<tonic::body::Body>| {
                        let path = request
                            .uri()
                            .path_and_query()
                            .map(|p| p.as_str().to_owned())
                            .unwrap_or_default();
                        *request.uri_mut() = format!("{base}{path}").parse().unwrap();
                        request
                    })
                    .layer(tonic_web::GrpcWebClientLayer::new())
                    .service(http);
                Some(Upstream::new(web))
            }
            _ => None,
        };
        Client3 {
            protocol,
            pool: DescriptorPool::decode(keel_proto::FILE_DESCRIPTOR_SET).unwrap(),
            upstream,
            http: Client::builder(TokioExecutor::new()).build_http(),
            origin,
        }
    }

    async fn call(&self, call: Call<'_>) -> Outcome {
        match self.protocol {
            Protocol::Rest => self.rest(call).await,
            Protocol::Grpc | Protocol::GrpcWeb => self.grpc(call).await,
            Protocol::GrpcWebText | Protocol::GrpcWebJson => self.grpc_web_by_hand(call).await,
            Protocol::ConnectJson | Protocol::ConnectProto => self.connect(call).await,
        }
    }

    fn method(&self, rpc: &str) -> prost_reflect::MethodDescriptor {
        let (service, method) = rpc.split_once('/').unwrap();
        self.pool
            .get_service_by_name(&format!("keel.identity.v1.{service}"))
            .unwrap()
            .methods()
            .find(|m| m.name() == method)
            .unwrap()
    }

    fn reply_json(method: &prost_reflect::MethodDescriptor, message: &[u8]) -> Value {
        let output = DynamicMessage::decode(method.output(), message).unwrap();
        let options = SerializeOptions::new().skip_default_fields(false);
        output
            .serialize_with_options(serde_json::value::Serializer, &options)
            .unwrap()
    }

    fn status_outcome(status: &tonic::Status) -> Outcome {
        use tonic_types::StatusExt;
        let fields = status
            .get_error_details()
            .bad_request()
            .map(|bad| bad.field_violations.iter().map(|v| v.field.clone()).collect())
            .unwrap_or_default();
        Err((keel_kernel::Code::from_grpc(status.code()).as_str().to_owned(), fields))
    }

    async fn post(&self, call: &Call<'_>, content_type: &str, body: Bytes) -> http::Response<Bytes> {
        let mut builder = http::Request::builder()
            .method("POST")
            .uri(format!("{}/keel.identity.v1.{}", self.origin, call.rpc))
            .header("content-type", content_type);
        if matches!(self.protocol, Protocol::ConnectJson | Protocol::ConnectProto) {
            builder = builder.header("connect-protocol-version", "1");
        } else {
            // grpc-web clients ask for the reply's form by `accept`.
            builder = builder.header("x-grpc-web", "1").header("accept", content_type);
        }
        if let Some(token) = call.token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let response = self.http.request(builder.body(Full::new(body)).unwrap()).await.unwrap();
        let (parts, body) = response.into_parts();
        http::Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    }

    /// grpc-web's text (base64) and JSON forms, framed by hand: data
    /// envelopes, then the trailer envelope with the status.
    async fn grpc_web_by_hand(&self, call: Call<'_>) -> Outcome {
        use base64::Engine as _;
        let method = self.method(call.rpc);
        let input = DynamicMessage::deserialize(method.input(), call.request.clone()).unwrap();
        let text = self.protocol == Protocol::GrpcWebText;
        let payload = if text {
            input.encode_to_vec()
        } else {
            call.request.to_string().into_bytes()
        };
        let mut frame = vec![0u8];
        frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(&payload);
        let (content_type, body) = if text {
            (
                "application/grpc-web-text",
                Bytes::from(base64::engine::general_purpose::STANDARD.encode(&frame)),
            )
        } else {
            ("application/grpc-web+json", Bytes::from(frame))
        };
        let response = self.post(&call, content_type, body).await;
        assert_eq!(response.status(), 200, "{:?}", self.protocol);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(content_type),
            "{:?}",
            response.headers()
        );
        // A trailers-only answer carries the status in the headers.
        let header_status = tonic::Status::from_header_map(response.headers());
        let mut body = response.into_body().to_vec();
        if text {
            // Each envelope is encoded on its own, padding included, so the
            // body is decoded one 4-character quantum at a time.
            body = body
                .chunks(4)
                .flat_map(|quantum| base64::engine::general_purpose::STANDARD.decode(quantum).unwrap())
                .collect();
        }
        let (mut message, mut trailers) = (None, http::HeaderMap::new());
        let mut rest = &body[..];
        while !rest.is_empty() {
            let flags = rest[0];
            let length = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
            let payload = &rest[5..5 + length];
            if flags & 0x80 != 0 {
                for line in std::str::from_utf8(payload)
                    .unwrap()
                    .split("\r\n")
                    .filter(|l| !l.is_empty())
                {
                    let (name, value) = line.split_once(':').unwrap();
                    trailers.append(
                        http::HeaderName::try_from(name.trim()).unwrap(),
                        value.trim().parse().unwrap(),
                    );
                }
            } else {
                message = Some(payload.to_vec());
            }
            rest = &rest[5 + length..];
        }
        let status = tonic::Status::from_header_map(&trailers)
            .or(header_status)
            .expect("grpc-status in a trailer envelope or the headers");
        if status.code() != tonic::Code::Ok {
            return Self::status_outcome(&status);
        }
        let message = message.expect("a reply message");
        if text {
            Ok(Self::reply_json(&method, &message))
        } else {
            let reply: Value = serde_json::from_slice(&message).unwrap();
            let reply = DynamicMessage::deserialize(method.output(), reply).unwrap();
            Ok(Self::reply_json(&method, &reply.encode_to_vec()))
        }
    }

    /// The Connect protocol's unary calls, JSON or binary.
    async fn connect(&self, call: Call<'_>) -> Outcome {
        use base64::Engine as _;
        let method = self.method(call.rpc);
        let json = self.protocol == Protocol::ConnectJson;
        let (content_type, body) = if json {
            ("application/json", Bytes::from(call.request.to_string()))
        } else {
            let input = DynamicMessage::deserialize(method.input(), call.request.clone()).unwrap();
            ("application/proto", Bytes::from(input.encode_to_vec()))
        };
        let response = self.post(&call, content_type, body).await;
        let status = response.status();
        if status.is_success() {
            assert_eq!(response.headers()["content-type"], content_type);
            let body = response.into_body();
            return if json {
                let reply: Value = serde_json::from_slice(&body).unwrap();
                let reply = DynamicMessage::deserialize(method.output(), reply).unwrap();
                Ok(Self::reply_json(&method, &reply.encode_to_vec()))
            } else {
                Ok(Self::reply_json(&method, &body))
            };
        }
        // Errors are JSON whatever the request's codec.
        assert_eq!(response.headers()["content-type"], "application/json");
        let error: Value = serde_json::from_slice(response.body()).unwrap();
        let code = error["code"].as_str().unwrap().to_ascii_uppercase();
        let expected = keel_kernel::Code::ALL
            .into_iter()
            .find(|c| c.as_str() == code)
            .unwrap()
            .http_status();
        assert_eq!(status.as_u16(), expected, "{code}");
        let bad_request = self.pool.get_message_by_name("google.rpc.BadRequest").unwrap();
        let fields = error["details"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|detail| detail["type"] == "google.rpc.BadRequest")
            .flat_map(|detail| {
                let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(detail["value"].as_str().unwrap())
                    .unwrap();
                let message = DynamicMessage::decode(bad_request.clone(), bytes.as_slice()).unwrap();
                let json = serde_json::to_value(&message).unwrap();
                json["fieldViolations"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v["field"].as_str().unwrap().to_owned())
                    .collect::<Vec<_>>()
            })
            .collect();
        Err((code, fields))
    }

    async fn grpc(&self, call: Call<'_>) -> Outcome {
        let method = self.method(call.rpc);
        let input = DynamicMessage::deserialize(method.input(), call.request).unwrap();
        let mut request = tonic::Request::new(Bytes::from(input.encode_to_vec()));
        if let Some(token) = call.token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let path = format!("/keel.identity.v1.{}", call.rpc);
        match self.upstream.as_ref().unwrap().unary(&path, request).await {
            Ok(reply) => Ok(Self::reply_json(&method, &reply.message)),
            Err(status) => Self::status_outcome(&status),
        }
    }

    async fn rest(&self, call: Call<'_>) -> Outcome {
        let (method, path) = call.rest;
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.origin))
            .header("content-type", "application/json");
        if let Some(token) = call.token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let body = if method == "GET" || method == "DELETE" {
            String::new()
        } else {
            call.request.to_string()
        };
        let response = self
            .http
            .request(builder.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body: Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
        if status.is_success() {
            Ok(body["data"].clone())
        } else {
            let error = &body["error"];
            let code = error["code"].as_str().unwrap().to_owned();
            // The HTTP status is the one the kernel's table gives the code.
            let expected = keel_kernel::Code::ALL
                .into_iter()
                .find(|c| c.as_str() == code)
                .unwrap()
                .http_status();
            assert_eq!(status.as_u16(), expected, "{code}");
            let fields = error["details"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["@type"] == "type.googleapis.com/google.rpc.BadRequest")
                .flat_map(|d| {
                    d["fieldViolations"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v["field"].as_str().unwrap().to_owned())
                })
                .collect();
            Err((code, fields))
        }
    }
}

/// Replaces values that differ between runs (ids, times, tokens, keys).
fn normalise(value: &mut Value) {
    match value {
        Value::Object(object) => {
            for (key, item) in object.iter_mut() {
                let volatile = matches!(
                    key.as_str(),
                    "id" | "createdAt"
                        | "updatedAt"
                        | "accessToken"
                        | "refreshToken"
                        | "accessTokenExpiresAt"
                        | "refreshTokenExpiresAt"
                        | "sessionId"
                        | "x"
                        | "kid"
                        | "lastRefreshedAt"
                        | "expiresAt"
                        | "userAgent"
                        | "ipAddress"
                );
                if volatile {
                    *item = json!("<varies>");
                } else {
                    normalise(item);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalise),
        _ => {}
    }
}

const PASSWORD: &str = keel_testkit::PASSWORD;

/// The scenario: every identity flow, as (step, outcome) pairs.
async fn scenario(app: &TestApp, protocol: Protocol) -> Vec<(&'static str, Outcome)> {
    let client = Client3::new(app, protocol).await;
    let mut log: Vec<(&'static str, Outcome)> = Vec::new();
    let register = |email: &str| Call {
        rpc: "IdentityCommandService/Register",
        rest: ("POST", "/v1/auth/register".into()),
        request: json!({"email": email, "password": PASSWORD, "displayName": "Ada"}),
        token: None,
    };
    let login = |password: &str| Call {
        rpc: "IdentityCommandService/Login",
        rest: ("POST", "/v1/auth/login".into()),
        request: json!({"email": "ada@example.com", "password": password}),
        token: None,
    };
    log.push(("register", client.call(register("ada@example.com")).await));
    log.push(("register again", client.call(register("ADA@example.com")).await));
    log.push((
        "register invalid",
        client
            .call(Call {
                rpc: "IdentityCommandService/Register",
                rest: ("POST", "/v1/auth/register".into()),
                request: json!({"email": "nope", "password": "short", "displayName": ""}),
                token: None,
            })
            .await,
    ));
    log.push(("login wrong password", client.call(login("not the password")).await));
    let tokens = client.call(login(PASSWORD)).await;
    let access = tokens.as_ref().unwrap()["tokens"]["accessToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let refresh = tokens.as_ref().unwrap()["tokens"]["refreshToken"]
        .as_str()
        .unwrap()
        .to_owned();
    log.push(("login", tokens));
    log.push((
        "current user",
        client
            .call(Call {
                rpc: "IdentityQueryService/GetCurrentUser",
                rest: ("GET", "/v1/users/me".into()),
                request: json!({}),
                token: Some(&access),
            })
            .await,
    ));
    log.push((
        "current user without token",
        client
            .call(Call {
                rpc: "IdentityQueryService/GetCurrentUser",
                rest: ("GET", "/v1/users/me".into()),
                request: json!({}),
                token: None,
            })
            .await,
    ));
    let bob = client.call(register("bob@example.com")).await;
    let bob_id = bob.unwrap()["user"]["id"].as_str().unwrap().to_owned();
    log.push((
        "another user's id",
        client
            .call(Call {
                rpc: "IdentityQueryService/GetUser",
                rest: ("GET", format!("/v1/users/{bob_id}")),
                request: json!({"id": bob_id}),
                token: Some(&access),
            })
            .await,
    ));
    log.push((
        "list users as a user",
        client
            .call(Call {
                rpc: "IdentityQueryService/ListUsers",
                rest: ("GET", "/v1/users?page_size=10".into()),
                request: json!({"pageSize": 10}),
                token: Some(&access),
            })
            .await,
    ));
    let me_id = log[4].1.as_ref().unwrap()["user"]["id"].as_str().unwrap().to_owned();
    log.push((
        "rename",
        client
            .call(Call {
                rpc: "IdentityCommandService/UpdateUser",
                rest: ("PATCH", format!("/v1/users/{me_id}?update_mask=displayName")),
                request: match protocol {
                    Protocol::Rest => json!({"displayName": "Ada L."}),
                    _ => json!({"user": {"id": me_id, "displayName": "Ada L."}, "updateMask": "displayName"}),
                },
                token: Some(&access),
            })
            .await,
    ));
    log.push((
        "promote yourself",
        client
            .call(Call {
                rpc: "IdentityCommandService/UpdateUser",
                rest: ("PATCH", format!("/v1/users/{me_id}?update_mask=role")),
                request: match protocol {
                    Protocol::Rest => json!({"role": "ROLE_ADMIN"}),
                    _ => json!({"user": {"id": me_id, "role": "ROLE_ADMIN"}, "updateMask": "role"}),
                },
                token: Some(&access),
            })
            .await,
    ));
    log.push((
        "sessions",
        client
            .call(Call {
                rpc: "IdentityQueryService/ListSessions",
                rest: ("GET", "/v1/sessions".into()),
                request: json!({}),
                token: Some(&access),
            })
            .await,
    ));
    log.push((
        "refresh",
        client
            .call(Call {
                rpc: "IdentityCommandService/RefreshSession",
                rest: ("POST", "/v1/auth/refresh".into()),
                request: json!({"refreshToken": refresh}),
                token: None,
            })
            .await,
    ));
    log.push((
        "change password with a wrong current one",
        client
            .call(Call {
                rpc: "IdentityCommandService/ChangePassword",
                rest: ("POST", "/v1/users/me/password".into()),
                request: json!({"currentPassword": "wrong password", "newPassword": "a new long passphrase"}),
                token: Some(&access),
            })
            .await,
    ));
    log.push((
        "jwks",
        client
            .call(Call {
                rpc: "IdentityQueryService/GetJwks",
                rest: ("GET", "/v1/auth/jwks".into()),
                request: json!({}),
                token: None,
            })
            .await,
    ));
    log.push((
        "logout",
        client
            .call(Call {
                rpc: "IdentityCommandService/Logout",
                rest: ("POST", "/v1/auth/logout".into()),
                request: json!({}),
                token: Some(&access),
            })
            .await,
    ));
    log.push((
        "current user after logout",
        client
            .call(Call {
                rpc: "IdentityQueryService/GetCurrentUser",
                rest: ("GET", "/v1/users/me".into()),
                request: json!({}),
                token: Some(&access),
            })
            .await,
    ));
    // Anonymous calls that need a caller are refused before their request
    // is validated: no field rules for someone who may not call at all.
    log.push((
        "create user anonymously with an empty body",
        client
            .call(Call {
                rpc: "IdentityCommandService/CreateUser",
                rest: ("POST", "/v1/users".into()),
                request: json!({}),
                token: None,
            })
            .await,
    ));
    log.push((
        "delete a malformed user id anonymously",
        client
            .call(Call {
                rpc: "IdentityCommandService/DeleteUser",
                rest: ("DELETE", "/v1/users/not-an-id".into()),
                request: json!({"id": "not-an-id"}),
                token: None,
            })
            .await,
    ));
    let again = client.call(login(PASSWORD)).await;
    let access = again.as_ref().unwrap()["tokens"]["accessToken"]
        .as_str()
        .unwrap()
        .to_owned();
    log.push((
        "create user as a user",
        client
            .call(Call {
                rpc: "IdentityCommandService/CreateUser",
                rest: ("POST", "/v1/users".into()),
                request: json!({"email": "eve@example.com", "password": PASSWORD, "displayName": "Eve"}),
                token: Some(&access),
            })
            .await,
    ));
    log.push((
        "create user as a user with an empty body",
        client
            .call(Call {
                rpc: "IdentityCommandService/CreateUser",
                rest: ("POST", "/v1/users".into()),
                request: json!({}),
                token: Some(&access),
            })
            .await,
    ));
    for (_, outcome) in &mut log {
        if let Ok(value) = outcome {
            normalise(value);
        }
    }
    log
}

async fn every_protocol_agrees(backend: Backend) {
    let mut results = Vec::new();
    for protocol in [
        Protocol::Grpc,
        Protocol::GrpcWeb,
        Protocol::GrpcWebText,
        Protocol::GrpcWebJson,
        Protocol::ConnectJson,
        Protocol::ConnectProto,
        Protocol::Rest,
    ] {
        let app = spawn_app(backend).await;
        results.push((protocol, scenario(&app, protocol).await));
    }
    let (_, expected) = &results[0];
    // The scenario means what it says, whatever the protocol.
    let codes: Vec<_> = expected
        .iter()
        .map(|(step, outcome)| (*step, outcome.as_ref().err().map(|(code, _)| code.as_str())))
        .collect();
    assert_eq!(
        codes,
        [
            ("register", None),
            // Answered like a new account: Register does not reveal which emails have one.
            ("register again", None),
            ("register invalid", Some("INVALID_ARGUMENT")),
            ("login wrong password", Some("UNAUTHENTICATED")),
            ("login", None),
            ("current user", None),
            ("current user without token", Some("UNAUTHENTICATED")),
            ("another user's id", Some("NOT_FOUND")),
            ("list users as a user", Some("PERMISSION_DENIED")),
            ("rename", None),
            ("promote yourself", Some("PERMISSION_DENIED")),
            ("sessions", None),
            ("refresh", None),
            ("change password with a wrong current one", Some("INVALID_ARGUMENT")),
            ("jwks", None),
            ("logout", None),
            ("current user after logout", Some("UNAUTHENTICATED")),
            ("create user anonymously with an empty body", Some("UNAUTHENTICATED")),
            ("delete a malformed user id anonymously", Some("UNAUTHENTICATED")),
            ("create user as a user", Some("PERMISSION_DENIED")),
            // A signed-in caller still meets the handler's own order of checks.
            ("create user as a user with an empty body", Some("INVALID_ARGUMENT")),
        ]
    );
    let anonymous_create = &expected[17].1.as_ref().unwrap_err().1;
    assert!(anonymous_create.is_empty(), "{anonymous_create:?}");
    assert_eq!(
        expected[2].1.as_ref().unwrap_err().1,
        ["email", "password", "display_name"]
    );
    assert_eq!(expected[9].1.as_ref().unwrap()["user"]["displayName"], "Ada L.");
    for (protocol, outcome) in &results[1..] {
        for ((step, want), (_, got)) in expected.iter().zip(outcome) {
            assert_eq!(got, want, "{protocol:?} disagrees with gRPC at {step:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite() {
    every_protocol_agrees(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
async fn postgres() {
    every_protocol_agrees(Backend::Postgres).await;
}

// --- what browsers see: CORS and the security headers ------------------------

/// One plain HTTP/1.1 request to the app: status and headers (the body is
/// read and dropped).
async fn raw(app: &TestApp, request: http::Request<Full<Bytes>>) -> (http::StatusCode, http::HeaderMap) {
    let (mut parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    parts.uri = format!("{}{path}", app.endpoint()).parse().unwrap();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client.request(http::Request::from_parts(parts, body)).await.unwrap();
    let (parts, body) = response.into_parts();
    let _ = body.collect().await.unwrap();
    (parts.status, parts.headers)
}

fn get_with_origin(path: &str, origin: Option<&str>) -> http::Request<Full<Bytes>> {
    let mut request = http::Request::get(path);
    if let Some(origin) = origin {
        request = request.header("origin", origin);
    }
    request.body(Full::new(Bytes::new())).unwrap()
}

fn cors_of(headers: &http::HeaderMap) -> (Option<&str>, Option<&str>) {
    (
        headers
            .get("access-control-allow-origin")
            .map(|value| value.to_str().unwrap()),
        headers
            .get("access-control-allow-credentials")
            .map(|value| value.to_str().unwrap()),
    )
}

#[tokio::test]
async fn development_cors_answers_loopback_origins_only() {
    let app = spawn_app(Backend::Sqlite).await;
    for origin in ["http://localhost:5173", "http://127.0.0.1:3000", "http://[::1]:8080"] {
        let (status, headers) = raw(&app, get_with_origin("/healthz", Some(origin))).await;
        assert_eq!(status, http::StatusCode::OK);
        assert_eq!(cors_of(&headers), (Some(origin), Some("true")), "{origin}");
    }
    for origin in ["null", "https://evil.example", "http://localhost.evil.example"] {
        let (_, headers) = raw(&app, get_with_origin("/healthz", Some(origin))).await;
        assert_eq!(cors_of(&headers), (None, None), "{origin}");
    }
    let (_, headers) = raw(&app, get_with_origin("/healthz", None)).await;
    assert!(
        !headers.keys().any(|name| name.as_str().starts_with("access-control-")),
        "{headers:?}"
    );
}

#[tokio::test]
async fn a_configured_wildcard_never_allows_credentials() {
    let app = keel_testkit::spawn_app_with(Backend::Sqlite, |config| {
        config.env = keel_server::config::Environment::Production;
        let keys = config.data_dir.join("keys.json");
        std::fs::write(&keys, keel_identity::tokens::KeySet::generate_file()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        config.auth_keys_file = Some(keys);
        config.cors_allowed_origins = Some("https://app.example, *".to_owned());
    })
    .await;
    let (_, headers) = raw(&app, get_with_origin("/healthz", Some("https://app.example"))).await;
    assert_eq!(cors_of(&headers), (Some("https://app.example"), Some("true")));
    let (_, headers) = raw(&app, get_with_origin("/healthz", Some("https://other.example"))).await;
    assert_eq!(cors_of(&headers), (Some("https://other.example"), None));
    let (_, headers) = raw(&app, get_with_origin("/healthz", Some("null"))).await;
    assert_eq!(cors_of(&headers), (None, None));
}

fn grpc_web_frame(message: &impl Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&body);
    Bytes::from(frame)
}

/// Login and RefreshSession hand out tokens: no cache may keep them
/// (RFC 6749 §5.1), over REST and grpc-web alike; and they carry the rest
/// of the browser headers, HSTS when configured.
#[tokio::test]
async fn token_answers_are_no_store_with_the_security_headers_over_rest_and_grpc_web() {
    let app = keel_testkit::spawn_app_with(Backend::Sqlite, |config| config.hsts = true).await;
    let tokens = {
        app.register("ada@example.com").await;
        app.login("ada@example.com").await
    };
    let login = json!({"email": "ada@example.com", "password": PASSWORD}).to_string();
    let refresh = json!({"refreshToken": tokens.refresh_token}).to_string();
    let rest = |path: &str, body: String| {
        http::Request::post(path)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    let grpc_web = |path: &str, body: Bytes| {
        http::Request::post(path)
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .body(Full::new(body))
            .unwrap()
    };
    let answers = [
        ("rest login", rest("/v1/auth/login", login)),
        (
            "grpc-web login",
            grpc_web(
                "/keel.identity.v1.IdentityCommandService/Login",
                grpc_web_frame(&keel_proto::identity::LoginRequest {
                    email: "ada@example.com".into(),
                    password: PASSWORD.into(),
                }),
            ),
        ),
        ("rest refresh", rest("/v1/auth/refresh", refresh)),
        (
            "grpc-web refresh with a bad token",
            grpc_web(
                "/keel.identity.v1.IdentityCommandService/RefreshSession",
                grpc_web_frame(&keel_proto::identity::RefreshSessionRequest {
                    refresh_token: "not a token".into(),
                }),
            ),
        ),
        ("docs", get_with_origin("/docs", None)),
    ];
    for (what, request) in answers {
        let (status, headers) = raw(&app, request).await;
        assert!(status.is_success(), "{what}: {status}");
        let header = |name: &str| headers.get(name).map(|value| value.to_str().unwrap().to_owned());
        assert_eq!(header("cache-control").as_deref(), Some("no-store"), "{what}");
        assert_eq!(header("x-content-type-options").as_deref(), Some("nosniff"), "{what}");
        assert_eq!(header("x-frame-options").as_deref(), Some("DENY"), "{what}");
        assert!(header("content-security-policy").is_some(), "{what}");
        assert_eq!(
            header("strict-transport-security").as_deref(),
            Some("max-age=31536000"),
            "{what}"
        );
    }
    // Without KEEL_HSTS no Strict-Transport-Security.
    let plain = spawn_app(Backend::Sqlite).await;
    let (_, headers) = raw(&plain, get_with_origin("/healthz", None)).await;
    assert!(headers.get("strict-transport-security").is_none());
    assert_eq!(headers.get("cache-control").unwrap(), "no-store");
}

// --- lookalike emails ----------------------------------------------------------

/// A fullwidth `ａda@example.com` is Ada's account; a Cyrillic `а` in the
/// domain or in a Latin local part is no address at all. Over REST, what a
/// browser sends; gRPC parses with the same `Email`.
#[tokio::test]
async fn lookalike_emails_reach_the_same_account_or_are_refused() {
    let app = spawn_app(Backend::Sqlite).await;
    let client = Client3::new(&app, Protocol::Rest).await;
    let register = |email: &str| Call {
        rpc: "IdentityCommandService/Register",
        rest: ("POST", "/v1/auth/register".into()),
        request: json!({"email": email, "password": PASSWORD, "displayName": "Ada"}),
        token: None,
    };
    client.call(register("ada@example.com")).await.unwrap();
    let login = client
        .call(Call {
            rpc: "IdentityCommandService/Login",
            rest: ("POST", "/v1/auth/login".into()),
            request: json!({"email": "\u{FF41}da@example.com", "password": PASSWORD}),
            token: None,
        })
        .await
        .unwrap();
    assert_eq!(login["user"]["email"], "ada@example.com");
    for lookalike in ["ada@ex\u{0430}mple.com", "\u{0430}da@example.com"] {
        assert_eq!(
            client.call(register(lookalike)).await.unwrap_err(),
            ("INVALID_ARGUMENT".to_owned(), vec!["email".to_owned()]),
            "{lookalike}"
        );
    }
}

/// An anonymous caller of a method that needs one gets UNAUTHENTICATED
/// before anything of its request is read: over REST even a body that is
/// not JSON, over gRPC an events method whose id does not parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_calls_are_refused_before_their_request_is_read() {
    let app = spawn_app(Backend::Sqlite).await;
    for (method, path, body) in [
        ("POST", "/v1/users", "{not json"),
        ("POST", "/v1/users", r#"{"noSuchField": 1}"#),
        ("POST", "/v1/dead-letters/not-an-id:replay", "{}"),
        ("GET", "/v1/audit-events?page_size=-1", ""),
    ] {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", app.endpoint()))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = Client::builder(TokioExecutor::new())
            .build_http()
            .request(request)
            .await
            .unwrap();
        let status = response.status();
        let body: Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(status, 401, "{method} {path}: {body}");
        assert_eq!(body["error"]["code"], "UNAUTHENTICATED", "{method} {path}");
    }

    use keel_proto::events::event_command_service_client::EventCommandServiceClient;
    use keel_proto::events::event_query_service_client::EventQueryServiceClient;
    let mut commands = EventCommandServiceClient::new(app.channel().await);
    let refused = commands
        .replay_dead_letter(keel_proto::events::ReplayDeadLetterRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let mut queries = EventQueryServiceClient::new(app.channel().await);
    let refused = queries
        .list_audit_events(keel_proto::events::ListAuditEventsRequest {
            user_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    // Public methods stay public.
    let jwks = app
        .queries()
        .await
        .get_jwks(keel_proto::identity::GetJwksRequest {})
        .await;
    assert!(jwks.is_ok(), "{jwks:?}");
}

// --- server streams over Connect and grpc-web JSON ---------------------------

/// Reads envelopes from a streaming body until `done` says so, with a
/// deadline: (flags, payload) pairs.
async fn envelopes_until(body: hyper::body::Incoming, done: impl Fn(&[(u8, Vec<u8>)]) -> bool) -> Vec<(u8, Vec<u8>)> {
    let mut body = std::pin::pin!(body);
    let mut buffer = Vec::new();
    let mut envelopes = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done(&envelopes) {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .expect("the stream delivered in time");
        let Some(frame) = frame else { break };
        if let Ok(data) = frame.unwrap().into_data() {
            buffer.extend_from_slice(&data);
        }
        while buffer.len() >= 5 {
            let length = u32::from_be_bytes(buffer[1..5].try_into().unwrap()) as usize;
            if buffer.len() < 5 + length {
                break;
            }
            envelopes.push((buffer[0], buffer[5..5 + length].to_vec()));
            buffer.drain(..5 + length);
        }
    }
    envelopes
}

async fn open_stream(
    app: &TestApp,
    content_type: &str,
    token: Option<&str>,
    message: &[u8],
) -> http::Response<hyper::body::Incoming> {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(message);
    let mut builder = http::Request::builder()
        .method("POST")
        .uri(format!("{}/keel.events.v1.EventQueryService/Subscribe", app.endpoint()))
        .header("content-type", content_type);
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    Client::builder(TokioExecutor::new())
        .build_http()
        .request(builder.body(Full::new(Bytes::from(frame))).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streams_over_connect_and_grpc_web_json() {
    let app = spawn_app(Backend::Sqlite).await;
    let (_, tokens) = app.signed_in("streams@example.com").await;
    let registered = |envelopes: &[(u8, Vec<u8>)]| {
        envelopes
            .iter()
            .any(|(_, payload)| String::from_utf8_lossy(payload).contains("identity.user.registered"))
    };
    for content_type in ["application/connect+json", "application/grpc-web+json"] {
        let response = open_stream(
            &app,
            content_type,
            Some(&tokens.access_token),
            br#"{"afterSequence": "0"}"#,
        )
        .await;
        assert_eq!(response.status(), 200, "{content_type}");
        assert_eq!(response.headers()["content-type"], content_type);
        let envelopes = envelopes_until(response.into_body(), registered).await;
        let (flags, payload) = envelopes
            .iter()
            .find(|(_, payload)| registered(&[(0, payload.clone())]))
            .unwrap();
        assert_eq!(*flags, 0, "{content_type}: a message envelope");
        let event: Value = serde_json::from_slice(payload).unwrap();
        assert!(event.is_object(), "{content_type}: {event}");
    }

    // Binary Connect: the same stream in protobuf.
    let request = keel_proto::events::SubscribeRequest::default().encode_to_vec();
    let response = open_stream(&app, "application/connect+proto", Some(&tokens.access_token), &request).await;
    assert_eq!(response.status(), 200);
    let envelopes = envelopes_until(response.into_body(), registered).await;
    let decoded = keel_proto::events::SubscribeResponse::decode(envelopes.last().unwrap().1.as_slice()).unwrap();
    assert_ne!(decoded, keel_proto::events::SubscribeResponse::default());

    // Errors end a Connect stream in its end-of-stream envelope, under 200;
    // grpc-web JSON in its trailer envelope.
    let response = open_stream(&app, "application/connect+json", None, b"{}").await;
    assert_eq!(response.status(), 200);
    let envelopes = envelopes_until(response.into_body(), |envelopes| !envelopes.is_empty()).await;
    assert_eq!(envelopes[0].0, 2, "an end-of-stream envelope");
    let end: Value = serde_json::from_slice(&envelopes[0].1).unwrap();
    assert_eq!(end["error"]["code"], "unauthenticated", "{end}");
    let response = open_stream(&app, "application/grpc-web+json", None, b"{}").await;
    let envelopes = envelopes_until(response.into_body(), |envelopes| !envelopes.is_empty()).await;
    assert_eq!(envelopes[0].0, 0x80, "a trailer envelope");
    let trailer = String::from_utf8(envelopes[0].1.clone()).unwrap();
    assert!(trailer.contains("grpc-status:16"), "{trailer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_errors_carry_details_and_refuse_what_they_cannot_serve() {
    let app = spawn_app(Backend::Sqlite).await;
    let post = |path: &'static str, headers: Vec<(&'static str, &'static str)>, body: &'static str| {
        let mut builder = http::Request::builder()
            .method("POST")
            .uri(format!("{}{path}", app.endpoint()));
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        let request = builder.body(Full::new(Bytes::from(body))).unwrap();
        async move {
            let response = Client::builder(TokioExecutor::new())
                .build_http()
                .request(request)
                .await
                .unwrap();
            let status = response.status();
            let body: Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes())
                .unwrap_or(Value::Null);
            (status, body)
        }
    };
    let json = ("content-type", "application/json");
    let register = "/keel.identity.v1.IdentityCommandService/Register";
    // Field violations as google.rpc.BadRequest, readable in `debug`.
    let (status, body) = post(
        register,
        vec![json],
        r#"{"email": "nope", "password": "x", "displayName": "A"}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "invalid_argument");
    assert_eq!(body["details"][0]["type"], "google.rpc.BadRequest", "{body}");
    assert_eq!(
        body["details"][0]["debug"]["fieldViolations"][0]["field"], "email",
        "{body}"
    );
    // Unknown fields and malformed JSON: INVALID_ARGUMENT, never a 500.
    for bad in [r#"{"noSuchField": 1}"#, "{not json", r#"{"email": 5}"#] {
        let (status, body) = post(register, vec![json], bad).await;
        assert_eq!(
            (status.as_u16(), body["code"].as_str()),
            (400, Some("invalid_argument")),
            "{bad}: {body}"
        );
    }
    // An anonymous caller of a method that needs one: 401 before the body.
    let (status, body) = post(
        "/keel.identity.v1.IdentityCommandService/CreateUser",
        vec![json],
        "{not json",
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (401, Some("unauthenticated")),
        "{body}"
    );
    // Unsupported protocol versions and compression are refused by name.
    let (status, body) = post(register, vec![json, ("connect-protocol-version", "2")], "{}").await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (400, Some("invalid_argument")),
        "{body}"
    );
    let (status, body) = post(register, vec![json, ("content-encoding", "gzip")], "{}").await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (501, Some("unimplemented")),
        "{body}"
    );
    // A unary method asked for as a stream (and the reverse): unimplemented.
    let (status, body) = post(
        "/keel.events.v1.EventQueryService/Subscribe",
        vec![("content-type", "application/json")],
        "{}",
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (501, Some("unimplemented")),
        "{body}"
    );
    // A deadline in connect-timeout-ms reaches the server.
    let (status, body) = post(
        "/keel.identity.v1.IdentityQueryService/GetJwks",
        vec![json, ("connect-timeout-ms", "soon")],
        "{}",
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (400, Some("invalid_argument")),
        "{body}"
    );
    let (status, body) = post(
        "/keel.identity.v1.IdentityQueryService/GetJwks",
        vec![json, ("connect-timeout-ms", "5000")],
        "{}",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["keys"].is_array(), "{body}");
    // And is kept: a sign-up hashes a password (Argon2id, tens of
    // milliseconds at least), which one millisecond does not allow.
    let (status, body) = post(
        "/keel.identity.v1.IdentityCommandService/Register",
        vec![json, ("connect-timeout-ms", "1")],
        r#"{"email":"late@example.com","password":"a long enough password","displayName":"Late"}"#,
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (504, Some("deadline_exceeded")),
        "{body}"
    );
}
