//! The transcoding rules, end to end through the one-listener service, on
//! the test-only contract in `testdata/` and a real tonic service (in
//! process, as the server runs it).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use base64::Engine;
use bytes::Bytes;
use futures::Stream;
use http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use tonic::{Response, Status};
use tower::ServiceExt;

use crate::headers::SecuritySettings;
use crate::listener::{CorsSettings, ListenerService, listener_service};
use crate::{Edge, Upstream};

mod pb {
    tonic::include_proto!("keel.testing.v1");
}

const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testing_descriptor.bin"));

use pb::transcode_test_service_server::{TranscodeTestService, TranscodeTestServiceServer};

struct TestService;

fn echo_metadata<T>(request: &tonic::Request<T>, response: &mut Response<impl Sized>) {
    for (from, to) in [
        ("foo", "x-echo-foo"),
        ("grpc-timeout", "x-echo-timeout"),
        ("authorization", "x-echo-authorization"),
        ("x-request-id", "x-echo-request-id"),
    ] {
        if let Some(value) = request.metadata().get(from) {
            response.metadata_mut().insert(to, value.clone());
        }
    }
}

#[tonic::async_trait]
impl TranscodeTestService for TestService {
    async fn echo(&self, request: tonic::Request<pb::EchoRequest>) -> Result<Response<pb::EchoResponse>, Status> {
        let inner = request.get_ref().clone();
        let mut response = Response::new(pb::EchoResponse { request: Some(inner) });
        echo_metadata(&request, &mut response);
        Ok(response)
    }

    async fn echo_all(&self, request: tonic::Request<pb::EchoRequest>) -> Result<Response<pb::EchoResponse>, Status> {
        Ok(Response::new(pb::EchoResponse {
            request: Some(request.into_inner()),
        }))
    }

    async fn get_thing(
        &self,
        request: tonic::Request<pb::GetThingRequest>,
    ) -> Result<Response<pb::GetThingResponse>, Status> {
        Ok(Response::new(pb::GetThingResponse {
            thing: Some(pb::Thing {
                name: request.into_inner().name,
                ..Default::default()
            }),
            etag: "v1".into(),
        }))
    }

    async fn create_thing(
        &self,
        request: tonic::Request<pb::CreateThingRequest>,
    ) -> Result<Response<pb::CreateThingResponse>, Status> {
        Ok(Response::new(pb::CreateThingResponse {
            thing: request.into_inner().thing,
        }))
    }

    async fn cancel(&self, request: tonic::Request<pb::CancelRequest>) -> Result<Response<pb::CancelResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(pb::CancelResponse {
            id: request.id,
            reason: request.reason,
        }))
    }

    async fn fail(&self, request: tonic::Request<pb::FailRequest>) -> Result<Response<pb::FailResponse>, Status> {
        let error = match request.into_inner().code {
            3 => keel_kernel::Error::invalid_field("thing.name", "is required"),
            5 => keel_kernel::Error::not_found("thing"),
            8 => keel_kernel::Error::resource_exhausted("slow down", Duration::from_secs(7)),
            13 => keel_kernel::Error::internal("the disk is on fire"),
            code => keel_kernel::Error::new(keel_kernel::Code::from_grpc(tonic::Code::from(code)), "as asked"),
        };
        Err(error.into())
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

    async fn watch(&self, request: tonic::Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let events = (1..=request.count as u64).map(move |sequence| {
            if request.fail_after > 0 && sequence > request.fail_after as u64 {
                Err(Status::aborted("the stream broke"))
            } else {
                Ok(pb::WatchEvent {
                    sequence,
                    text: format!("event {sequence}"),
                })
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    async fn files(&self, request: tonic::Request<pb::FilesRequest>) -> Result<Response<pb::FilesResponse>, Status> {
        Ok(Response::new(pb::FilesResponse {
            path: request.into_inner().path,
        }))
    }
}

fn listener(max_body_bytes: usize) -> ListenerService {
    listener_with_cors(
        max_body_bytes,
        &CorsSettings {
            allowed_origins: vec!["https://app.example".into()],
            allow_loopback: false,
        },
    )
}

fn listener_with_cors(max_body_bytes: usize, cors: &CorsSettings) -> ListenerService {
    listener_with(max_body_bytes, cors, &SecuritySettings::default())
}

fn listener_with(max_body_bytes: usize, cors: &CorsSettings, security: &SecuritySettings) -> ListenerService {
    let routes = tonic::service::Routes::new(TranscodeTestServiceServer::new(TestService)).prepare();
    let upstream = Upstream::new(routes);
    let edge = Arc::new(Edge::new(DESCRIPTORS, upstream, max_body_bytes).unwrap());
    listener_service(edge, cors, security)
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn data(&self) -> Value {
        assert!(
            self.status.is_success(),
            "{} {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        self.json()["data"].clone()
    }

    fn error(&self) -> Value {
        assert!(!self.status.is_success(), "{}", self.status);
        self.json()["error"].clone()
    }
}

async fn send(request: Request<Body>) -> Reply {
    send_to(listener(64 * 1024), request).await
}

async fn send_to(service: ListenerService, request: Request<Body>) -> Reply {
    let response = service.oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn get(uri: &str) -> Reply {
    send(Request::get(uri).body(Body::empty()).unwrap()).await
}

async fn post(uri: &str, body: Value) -> Reply {
    send(
        Request::post(uri)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn path_variables_and_typed_query_parameters() {
    let reply =
        get("/v1/echo/a%20b?page_size=5&flag=true&big=9007199254740993&state=STATE_PAID&ratio=0.5&blob=aGk%3D").await;
    let request = &reply.data()["request"];
    assert_eq!(request["id"], "a b");
    assert_eq!(request["pageSize"], 5);
    assert_eq!(request["flag"], true);
    assert_eq!(request["big"], "9007199254740993", "64-bit integers are strings");
    assert_eq!(request["state"], "STATE_PAID");
    assert_eq!(request["ratio"], 0.5);
    assert_eq!(request["blob"], "aGk=");
    // Enums by number too; lowerCamelCase and original names both accepted.
    let request = get("/v1/echo/x?state=1&pageSize=7").await.data()["request"].clone();
    assert_eq!(request["state"], "STATE_PENDING");
    assert_eq!(request["pageSize"], 7);
}

#[tokio::test]
async fn repeated_nested_and_well_known_query_parameters() {
    let reply = get(concat!(
        "/v1/echo/x?tag=a&tag=b&filter.state=STATE_PAID&filter.tags=t1&filter.tags=t2&filter.inner.min=3",
        "&since=2026-01-02T03:04:05Z&wait=1.5s&mask=displayName,filter.state&limit=7"
    ))
    .await;
    let request = &reply.data()["request"];
    assert_eq!(request["tag"], json!(["a", "b"]));
    assert_eq!(
        request["filter"],
        json!({"state": "STATE_PAID", "tags": ["t1", "t2"], "inner": {"min": "3"}})
    );
    assert_eq!(request["since"], "2026-01-02T03:04:05Z");
    assert_eq!(request["wait"], "1.500s");
    assert_eq!(request["mask"], "displayName,filter.state");
    assert_eq!(request["limit"], 7);
}

#[tokio::test]
async fn bad_query_parameters_are_400s_that_name_them() {
    for (uri, needle) in [
        ("/v1/echo/x?nope=1", "nope"),
        ("/v1/echo/x?filter.nope=1", "filter.nope"),
        ("/v1/echo/x?flag=maybe", "flag"),
        ("/v1/echo/x?page_size=many", "page_size"),
        ("/v1/echo/x?filter=1", "filter"),
        ("/v1/echo/x?state=STATE_BOGUS", "STATE_BOGUS"),
        ("/v1/echo/x?since=yesterday", "since"),
    ] {
        let reply = get(uri).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{uri}");
        let error = reply.error();
        assert_eq!(error["code"], "INVALID_ARGUMENT");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(needle), "{uri}: {message}");
    }
}

#[tokio::test]
async fn a_body_field_with_maps_oneofs_and_defaults() {
    let reply = post(
        "/v1/echo/id-1",
        json!({
            "display_name": "original name accepted",
            "counts": {"a": 1, "b": 2},
            "number": 42,
            "blob": "AAEC",
            "at": "2026-11-21T10:00:00.5Z",
            "maybeFlag": false,
            "extra": {"k": [1, "two", null]},
            "filters": [{"state": "STATE_PENDING"}]
        }),
    )
    .await;
    let thing = &reply.data()["request"]["thing"];
    assert_eq!(thing["displayName"], "original name accepted");
    assert_eq!(thing["counts"], json!({"a": 1, "b": 2}));
    assert_eq!(thing["number"], 42);
    assert!(thing.get("text").is_none(), "only the set member of a oneof");
    assert_eq!(thing["blob"], "AAEC");
    assert_eq!(thing["at"], "2026-11-21T10:00:00.500Z");
    assert_eq!(thing["maybeFlag"], false);
    assert_eq!(thing["extra"], json!({"k": [1.0, "two", null]}));
    // Defaults are emitted: clients see 0, false, "" and [].
    assert_eq!(thing["ratio"], 0.0);
    assert_eq!(thing["flag"], false);
    assert_eq!(thing["name"], "");
    assert_eq!(thing["tags"], json!([]));
    assert_eq!(thing["big"], "0");
    assert_eq!(reply.data()["request"]["id"], "id-1");
}

#[tokio::test]
async fn unknown_and_malformed_json_are_400s_that_say_where() {
    let reply = post("/v1/echo/x", json!({"name": "n", "bogus": 1})).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.error()["message"].as_str().unwrap().contains("bogus"));

    let reply = send(
        Request::post("/v1/echo:all")
            .header("content-type", "application/json")
            .body(Body::from("{\n  \"id\": \"x\",\n  \"pageSize\": ]\n}"))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let message = reply.error()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("line 3"), "{message}");

    let reply = post("/v1/echo:all", json!([1, 2])).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn body_star_custom_verbs_and_additional_bindings() {
    let reply = post("/v1/echo:all", json!({"id": "all", "tag": ["x"], "big": "12"})).await;
    assert_eq!(reply.data()["request"]["tag"], json!(["x"]));
    assert_eq!(reply.data()["request"]["big"], "12");
    // With body "*" every field comes from the body.
    assert_eq!(
        send(
            Request::post("/v1/echo:all?id=q")
                .header("content-type", "application/json")
                .body(Body::from("{}"))
                .unwrap()
        )
        .await
        .status,
        StatusCode::BAD_REQUEST
    );

    let reply = post("/v1/orders/o-7:cancel", json!({"reason": "changed mind"})).await;
    assert_eq!(reply.data(), json!({"id": "o-7", "reason": "changed mind"}));
    assert_eq!(post("/v1/orders/o-7", json!({})).await.status, StatusCode::NOT_FOUND);

    let reply = get("/v1/books/shelves/1/books/2").await;
    assert_eq!(reply.data()["request"]["thing"]["name"], "shelves/1/books/2");
    assert_eq!(get("/v1/books/shelves/1/notes/2").await.status, StatusCode::NOT_FOUND);

    let reply = get("/v1/files/a/b/c.txt").await;
    assert_eq!(reply.data()["path"], "a/b/c.txt");
}

#[tokio::test]
async fn response_body_and_creation_status() {
    let reply = get("/v1/shelves/9/things/4").await;
    let data = reply.data();
    assert_eq!(data["name"], "shelves/9/things/4");
    assert!(data.get("etag").is_none(), "response_body picks the one field");

    let reply = post("/v1/things", json!({"name": "new"})).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.data()["thing"]["name"], "new");
}

#[tokio::test]
async fn errors_keep_their_code_status_and_details() {
    let reply = get("/v1/fail/5").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let error = reply.error();
    assert_eq!(error["code"], "NOT_FOUND");
    assert_eq!(error["message"], "thing not found");
    assert_eq!(error["details"], json!([]));
    assert_eq!(
        error["request_id"].as_str(),
        reply.headers.get("x-request-id").and_then(|v| v.to_str().ok())
    );

    let error = get("/v1/fail/3").await.error();
    assert_eq!(
        error["details"][0]["@type"],
        "type.googleapis.com/google.rpc.BadRequest"
    );
    assert_eq!(error["details"][0]["fieldViolations"][0]["field"], "thing.name");

    let reply = get("/v1/fail/8").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.headers.get("retry-after").unwrap(), "7");
    assert_eq!(reply.error()["details"][0]["retryDelay"], "7s");

    let reply = get("/v1/fail/13").await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.error()["message"], "internal error");

    for (code, status) in [
        (1, 499),
        (4, 504),
        (6, 409),
        (7, 403),
        (9, 400),
        (10, 409),
        (11, 400),
        (12, 501),
        (14, 503),
        (16, 401),
    ] {
        assert_eq!(
            get(&format!("/v1/fail/{code}")).await.status.as_u16(),
            status,
            "gRPC code {code}"
        );
    }
}

#[tokio::test]
async fn http_level_errors() {
    let reply = get("/v1/nowhere").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error()["code"], "NOT_FOUND");

    let reply = send(Request::delete("/v1/echo/x").body(Body::empty()).unwrap()).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.headers.get("allow").unwrap(), "GET, POST");

    let reply = send(
        Request::post("/v1/echo:all")
            .header("content-type", "text/plain")
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let big = json!({"id": "x".repeat(70 * 1024)});
    let reply = post("/v1/echo:all", big).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.error()["code"], "RESOURCE_EXHAUSTED");

    let reply = send(Request::get("/v1/echo/x").body(Body::from("{\"a\":1}")).unwrap()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn headers_travel_as_metadata_and_back() {
    let reply = send(
        Request::get("/v1/echo/x")
            .header("authorization", "Bearer t0k3n")
            .header("grpc-metadata-foo", "bar")
            .header("x-request-id", "rid-123")
            .header("x-request-timeout", "2.5")
            .header("x-unrelated", "dropped")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers.get("x-echo-foo").unwrap(), "bar");
    assert_eq!(reply.headers.get("x-echo-authorization").unwrap(), "Bearer t0k3n");
    assert_eq!(reply.headers.get("x-echo-request-id").unwrap(), "rid-123");
    let timeout = reply
        .headers
        .get("x-echo-timeout")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        timeout.ends_with('u') || timeout.ends_with('m') || timeout.ends_with('n'),
        "{timeout}"
    );
}

fn sse_events(body: &str) -> Vec<(Option<String>, Option<String>, Value)> {
    body.split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| {
            let (mut name, mut id, mut data) = (None, None, Value::Null);
            for line in event.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = Some(value.to_owned());
                } else if let Some(value) = line.strip_prefix("id: ") {
                    id = Some(value.to_owned());
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(value).unwrap();
                }
            }
            (name, id, data)
        })
        .collect()
}

#[tokio::test]
async fn server_streams_as_sse_with_ids_and_a_final_error_event() {
    let request = |uri: &str| {
        Request::get(uri)
            .header("accept", "text/event-stream")
            .body(Body::empty())
            .unwrap()
    };
    let reply = send(request("/v1/watch?count=3")).await;
    assert_eq!(reply.headers.get("content-type").unwrap(), "text/event-stream");
    let events = sse_events(std::str::from_utf8(&reply.body).unwrap());
    assert_eq!(events.len(), 3);
    for (index, (name, id, data)) in events.iter().enumerate() {
        assert_eq!(*name, None);
        assert_eq!(id.as_deref(), Some((index + 1).to_string().as_str()));
        assert_eq!(data["data"]["text"], format!("event {}", index + 1));
        assert_eq!(data["data"]["sequence"], (index + 1).to_string());
    }

    let reply = send(request("/v1/watch?count=5&fail_after=2")).await;
    let events = sse_events(std::str::from_utf8(&reply.body).unwrap());
    assert_eq!(events.len(), 3);
    assert_eq!(events[2].0.as_deref(), Some("error"));
    assert_eq!(events[2].2["error"]["code"], "ABORTED");
    assert_eq!(events[2].2["error"]["message"], "the stream broke");
}

#[tokio::test]
async fn server_streams_as_ndjson_without_sse() {
    let reply = get("/v1/watch?count=2&fail_after=1").await;
    assert_eq!(reply.headers.get("content-type").unwrap(), "application/x-ndjson");
    let lines: Vec<Value> = std::str::from_utf8(&reply.body)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["data"]["sequence"], "1");
    assert_eq!(lines[1]["error"]["code"], "ABORTED");
}

fn grpc_frame(message: &impl prost::Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// (messages, trailers) of a grpc-web response body.
fn grpc_web_frames(body: &[u8]) -> (Vec<Vec<u8>>, String) {
    let (mut messages, mut trailers, mut rest) = (Vec::new(), String::new(), body);
    while rest.len() >= 5 {
        let length = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let payload = rest[5..5 + length].to_vec();
        if rest[0] & 0x80 != 0 {
            trailers = String::from_utf8(payload).unwrap();
        } else {
            messages.push(payload);
        }
        rest = &rest[5 + length..];
    }
    (messages, trailers)
}

#[tokio::test]
async fn grpc_web_binary_and_text_on_the_same_listener() {
    use prost::Message;
    let frame = grpc_frame(&pb::EchoRequest {
        id: "web".into(),
        ..Default::default()
    });
    let reply = send(
        Request::post("/keel.testing.v1.TranscodeTestService/Echo")
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .body(Body::from(frame.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let (messages, trailers) = grpc_web_frames(&reply.body);
    assert_eq!(
        pb::EchoResponse::decode(&messages[0][..]).unwrap().request.unwrap().id,
        "web"
    );
    assert!(trailers.contains("grpc-status:0"), "{trailers}");

    let text = base64::engine::general_purpose::STANDARD.encode(&frame);
    let reply = send(
        Request::post("/keel.testing.v1.TranscodeTestService/Echo")
            .header("content-type", "application/grpc-web-text")
            .header("accept", "application/grpc-web-text")
            .body(Body::from(text))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.headers.get("content-type").unwrap(),
        "application/grpc-web-text+proto"
    );
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(&reply.body)
        .unwrap_or_else(|_| {
            // Each frame may be encoded separately: decode the pieces.
            reply
                .body
                .split(|byte| *byte == b'=')
                .filter(|piece| !piece.is_empty())
                .flat_map(|piece| base64::engine::general_purpose::STANDARD_NO_PAD.decode(piece).unwrap())
                .collect()
        });
    let (messages, _) = grpc_web_frames(&decoded);
    assert_eq!(
        pb::EchoResponse::decode(&messages[0][..]).unwrap().request.unwrap().id,
        "web"
    );

    // Server streaming over grpc-web.
    let reply = send(
        Request::post("/keel.testing.v1.TranscodeTestService/Watch")
            .header("content-type", "application/grpc-web+proto")
            .body(Body::from(grpc_frame(&pb::WatchRequest {
                count: 3,
                fail_after: 0,
            })))
            .unwrap(),
    )
    .await;
    let (messages, trailers) = grpc_web_frames(&reply.body);
    assert_eq!(messages.len(), 3);
    assert!(trailers.contains("grpc-status:0"));
}

#[tokio::test]
async fn cors_preflight_and_exposed_grpc_web_headers() {
    let reply = send(
        Request::options("/keel.testing.v1.TranscodeTestService/Echo")
            .header("origin", "https://app.example")
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,x-grpc-web,authorization",
            )
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(reply.status.is_success(), "{}", reply.status);
    assert_eq!(
        reply.headers.get("access-control-allow-origin").unwrap(),
        "https://app.example"
    );
    assert_eq!(reply.headers.get("access-control-allow-credentials").unwrap(), "true");

    // REST's custom metadata (`grpc-metadata-*`) is allowed by prefix; a
    // header the edge does not take is left out, so the browser refuses it.
    let reply = send(
        Request::options("/v1/echo/x")
            .header("origin", "https://app.example")
            .header("access-control-request-method", "GET")
            .header(
                "access-control-request-headers",
                "authorization, grpc-metadata-tenant,x-evil,grpc-metadata-,if-none-match",
            )
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(reply.status.is_success(), "{}", reply.status);
    let allowed = reply.headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(allowed, "authorization,grpc-metadata-tenant,if-none-match");

    let reply = send(
        Request::get("/v1/echo/x")
            .header("origin", "https://app.example")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let exposed = reply
        .headers
        .get("access-control-expose-headers")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    // `etag`: a page revalidates its reads with `If-None-Match`; the
    // guards' headers tell it a replay and how much of its limit is left.
    let exposed: Vec<&str> = exposed.split(',').map(str::trim).collect();
    for header in [
        "grpc-status",
        "grpc-message",
        "x-request-id",
        "etag",
        "idempotent-replayed",
        "ratelimit-policy",
        "ratelimit",
    ] {
        assert!(exposed.contains(&header), "{exposed:?}");
    }

    let reply = send(
        Request::get("/v1/echo/x")
            .header("origin", "https://evil.example")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(reply.headers.get("access-control-allow-origin").is_none());
}

fn cors_headers(reply: &Reply) -> Vec<String> {
    reply
        .headers
        .keys()
        .map(|name| name.as_str().to_owned())
        .filter(|name| name.starts_with("access-control-"))
        .collect()
}

/// A simple GET and a preflight from `origin`: the allowed origin and
/// whether credentials were allowed, for each.
async fn cors_answer(cors: &CorsSettings, origin: &str) -> [(Option<String>, bool); 2] {
    let simple = send_to(
        listener_with_cors(1024, cors),
        Request::get("/v1/echo/x")
            .header("origin", origin)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let preflight = send_to(
        listener_with_cors(1024, cors),
        Request::options("/keel.testing.v1.TranscodeTestService/Echo")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type,authorization")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    [simple, preflight].map(|reply| {
        let allowed = reply
            .headers
            .get("access-control-allow-origin")
            .map(|value| value.to_str().unwrap().to_owned());
        let credentials = reply.headers.get("access-control-allow-credentials").is_some();
        (allowed, credentials)
    })
}

#[tokio::test]
async fn development_cors_allows_loopback_origins_only() {
    let development = CorsSettings {
        allowed_origins: Vec::new(),
        allow_loopback: true,
    };
    for origin in [
        "http://localhost:5173",
        "http://localhost",
        "http://127.0.0.1:3000",
        "http://[::1]:8080",
        "https://localhost:8443",
    ] {
        assert_eq!(
            cors_answer(&development, origin).await,
            [(Some(origin.to_owned()), true), (Some(origin.to_owned()), true)],
            "{origin}"
        );
    }
    for origin in [
        "null",
        "https://evil.example",
        "http://localhost.evil.example",
        "http://localhost@evil.example",
        "http://127.0.0.1.nip.io",
        "http://localhost:8080/path",
        "http://localhost:123456",
        "file://",
    ] {
        assert_eq!(
            cors_answer(&development, origin).await,
            [(None, false), (None, false)],
            "{origin}"
        );
    }
}

#[tokio::test]
async fn a_wildcard_allows_any_origin_but_never_credentials_nor_null() {
    let wildcard = CorsSettings {
        allowed_origins: vec!["*".into()],
        allow_loopback: false,
    };
    assert_eq!(
        cors_answer(&wildcard, "https://any.example").await,
        [
            (Some("https://any.example".to_owned()), false),
            (Some("https://any.example".to_owned()), false)
        ]
    );
    assert_eq!(cors_answer(&wildcard, "null").await, [(None, false), (None, false)]);

    // Listed origins keep their credentials beside a wildcard.
    let both = CorsSettings {
        allowed_origins: vec!["https://app.example".into(), "*".into()],
        allow_loopback: false,
    };
    assert_eq!(
        cors_answer(&both, "https://app.example").await,
        [
            (Some("https://app.example".to_owned()), true),
            (Some("https://app.example".to_owned()), true)
        ]
    );
    assert_eq!(
        cors_answer(&both, "https://other.example").await,
        [
            (Some("https://other.example".to_owned()), false),
            (Some("https://other.example".to_owned()), false)
        ]
    );
    // A refused origin gets no credentials flag either.
    let listed = CorsSettings {
        allowed_origins: vec!["https://app.example".into()],
        allow_loopback: false,
    };
    assert_eq!(
        cors_answer(&listed, "https://evil.example").await,
        [(None, false), (None, false)]
    );
}

#[tokio::test]
async fn requests_without_an_origin_get_no_cors_headers() {
    for cors in [
        CorsSettings {
            allowed_origins: vec!["*".into()],
            allow_loopback: true,
        },
        CorsSettings {
            allowed_origins: vec!["https://app.example".into()],
            allow_loopback: false,
        },
    ] {
        let reply = send_to(
            listener_with_cors(1024, &cors),
            Request::get("/v1/echo/x").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(cors_headers(&reply), Vec::<String>::new());
        assert_eq!(reply.headers.get("vary").unwrap(), "origin");

        let reply = send_to(
            listener_with_cors(1024, &cors),
            Request::post("/keel.testing.v1.TranscodeTestService/Watch")
                .header("content-type", "application/grpc-web+proto")
                .body(Body::from(grpc_frame(&pb::WatchRequest {
                    count: 1,
                    fail_after: 0,
                })))
                .unwrap(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(cors_headers(&reply), Vec::<String>::new());
    }
}

const BROWSER_HEADERS: [(&str, &str); 6] = [
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    ("content-security-policy", crate::headers::API_CONTENT_SECURITY_POLICY),
];

fn header<'a>(reply: &'a Reply, name: &str) -> Option<&'a str> {
    reply.headers.get(name).map(|value| value.to_str().unwrap())
}

#[tokio::test]
async fn every_browser_facing_answer_carries_the_security_headers() {
    let grpc_web = || {
        Request::post("/keel.testing.v1.TranscodeTestService/Watch")
            .header("content-type", "application/grpc-web+proto")
            .body(Body::from(grpc_frame(&pb::WatchRequest {
                count: 1,
                fail_after: 0,
            })))
            .unwrap()
    };
    let answers = [
        ("rest", Request::get("/v1/echo/x").body(Body::empty()).unwrap()),
        (
            "rest error",
            Request::get("/v1/fail/NOT_FOUND").body(Body::empty()).unwrap(),
        ),
        ("not found", Request::get("/nowhere").body(Body::empty()).unwrap()),
        ("healthz", Request::get("/healthz").body(Body::empty()).unwrap()),
        ("openapi", Request::get("/openapi.json").body(Body::empty()).unwrap()),
        ("readyz", Request::get("/readyz").body(Body::empty()).unwrap()),
        ("grpc-web", grpc_web()),
        (
            "preflight",
            Request::options("/v1/echo/x")
                .header("origin", "https://app.example")
                .header("access-control-request-method", "GET")
                .body(Body::empty())
                .unwrap(),
        ),
        (
            "cross-origin",
            Request::get("/v1/echo/x")
                .header("origin", "https://app.example")
                .body(Body::empty())
                .unwrap(),
        ),
    ];
    for (what, request) in answers {
        let reply = send(request).await;
        for (name, value) in BROWSER_HEADERS {
            assert_eq!(header(&reply, name), Some(value), "{what}: {name}");
        }
        // A successful GET read is tagged and revalidated instead.
        let cache = if matches!(what, "rest" | "cross-origin") {
            "private, no-cache"
        } else {
            "no-store"
        };
        assert_eq!(header(&reply, "cache-control"), Some(cache), "{what}");
        assert_eq!(header(&reply, "strict-transport-security"), None, "{what}");
        // Every answer names its request, the plain endpoints too.
        assert!(
            header(&reply, "x-request-id").is_some_and(|id| !id.is_empty()),
            "{what}: x-request-id"
        );
    }

    // `/docs` serves Swagger UI from the binary: its own policy, scripts
    // and styles from this origin only, still no framing.
    let docs = get("/docs").await;
    let policy = header(&docs, "content-security-policy").unwrap();
    assert_eq!(policy, crate::docs::DOCS_CONTENT_SECURITY_POLICY);
    assert_eq!(header(&docs, "x-frame-options"), Some("DENY"));

    // A server stream keeps its own cache directive.
    let sse = send(
        Request::get("/v1/watch?count=1")
            .header("accept", "text/event-stream")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(header(&sse, "cache-control"), Some("no-cache"));
    assert_eq!(header(&sse, "x-content-type-options"), Some("nosniff"));

    // HSTS when the operator says keel is reached over HTTPS only.
    let hsts = send_to(
        listener_with(1024, &CorsSettings::default(), &SecuritySettings { hsts: true }),
        grpc_web(),
    )
    .await;
    assert_eq!(
        header(&hsts, "strict-transport-security"),
        Some(crate::headers::STRICT_TRANSPORT_SECURITY)
    );
}

#[tokio::test]
async fn native_grpc_answers_carry_no_browser_headers() {
    let reply = send_to(
        listener_with(1024, &CorsSettings::default(), &SecuritySettings { hsts: true }),
        Request::post("/keel.testing.v1.TranscodeTestService/Watch")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Body::from(grpc_frame(&pb::WatchRequest {
                count: 1,
                fail_after: 0,
            })))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(header(&reply, "content-type"), Some("application/grpc"));
    for name in BROWSER_HEADERS
        .map(|(name, _)| name)
        .into_iter()
        .chain(["cache-control", "strict-transport-security"])
    {
        assert_eq!(header(&reply, name), None, "{name}");
    }
}

/// A concrete URL for an OpenAPI path: each `{param}` replaced by a value
/// that fits its pattern.
fn sample_path(path: &str, operation: &Value) -> String {
    let mut out = path.to_owned();
    for parameter in operation["parameters"].as_array().unwrap() {
        if parameter["in"] != "path" {
            continue;
        }
        let name = parameter["name"].as_str().unwrap();
        let value = match parameter["schema"]["description"].as_str() {
            Some(pattern) => pattern
                .trim_start_matches("matches ")
                .replace("**", "a/b")
                .replace('*', "1"),
            None if parameter["schema"]["type"] == "integer" => "5".to_owned(),
            None => "sample".to_owned(),
        };
        out = out.replace(&format!("{{{name}}}"), &value);
    }
    out
}

#[tokio::test]
async fn every_route_is_documented_and_every_documented_path_is_served() {
    let upstream = crate::upstream::unreachable_upstream();
    let edge = Edge::new(DESCRIPTORS, upstream, 1024).unwrap();
    let document = edge.openapi().clone();
    let paths = document["paths"].as_object().unwrap();
    for route in edge.routes.routes() {
        let documented = paths.iter().any(|(path, item)| {
            item.get(route.http_method.as_str().to_ascii_lowercase()).is_some()
                && crate::template::PathTemplate::parse(path)
                    .map(|template| {
                        template
                            .matches(&sample_path(
                                path,
                                &item[route.http_method.as_str().to_ascii_lowercase()],
                            ))
                            .is_some()
                    })
                    .unwrap_or(false)
        });
        assert!(
            documented,
            "{} {} is not documented",
            route.http_method,
            route.template.source()
        );
    }
    let mut served = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let uri = sample_path(path, operation);
            let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
            assert!(
                matches!(edge.routes.find(&method, &uri), crate::routes::RouteMatch::Found(..)),
                "documented {method} {path} ({uri}) is not served"
            );
            served += 1;
        }
    }
    assert_eq!(served, edge.routes.routes().len());
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(
        paths["/v1/things"]["post"]["responses"]["201"]["content"]["application/json"]["schema"]["properties"]["data"]
            ["$ref"],
        "#/components/schemas/keel.testing.v1.CreateThingResponse"
    );
}

/// The `{name}`s of an OpenAPI path template.
fn template_names(path: &str) -> Vec<String> {
    path.split('{')
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name.to_owned()))
        .collect()
}

/// Keel's own document: GET, PATCH and DELETE `/v1/users/{id}` share one
/// path item, and every operation of every path item declares exactly the
/// template's path parameters; an operation whose variable sets another
/// field (`user.id`) says so.
#[test]
fn every_operation_declares_the_path_parameters_of_its_template() {
    let edge = Edge::new(
        keel_proto::FILE_DESCRIPTOR_SET,
        crate::upstream::unreachable_upstream(),
        1024,
    )
    .unwrap();
    let document = edge.openapi();
    let paths = document["paths"].as_object().unwrap();
    for (path, item) in paths {
        let mut expected = template_names(path);
        expected.sort();
        for (method, operation) in item.as_object().unwrap() {
            let mut declared: Vec<String> = operation["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|parameter| parameter["in"] == "path")
                .map(|parameter| parameter["name"].as_str().unwrap().to_owned())
                .collect();
            declared.sort();
            assert_eq!(declared, expected, "{method} {path}");
        }
    }
    assert!(!paths.contains_key("/v1/users/{user.id}"), "{:?}", paths.keys());
    let users = &paths["/v1/users/{id}"];
    let path_parameter = |method: &str| {
        users[method]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|parameter| parameter["in"] == "path")
            .unwrap()
            .clone()
    };
    for method in ["get", "delete"] {
        let parameter = path_parameter(method);
        assert_eq!(parameter["name"], "id", "{method}");
        assert_eq!(parameter.get("description"), None, "{method}: its own field");
    }
    let patch = path_parameter("patch");
    assert_eq!(patch["name"], "id");
    assert_eq!(patch["description"], "sets the request field user.id");
}

/// `/docs` and every file it loads come from the binary, under a policy
/// that allows this origin's scripts and styles only: no URL in the page
/// leaves keel, the page has no inline script, and the versioned assets
/// are cacheable for a year.
#[tokio::test]
async fn docs_are_served_from_the_binary_under_a_strict_policy() {
    let docs = get("/docs").await;
    assert_eq!(docs.status, StatusCode::OK);
    assert_eq!(header(&docs, "content-type"), Some("text/html; charset=utf-8"));
    let policy = header(&docs, "content-security-policy").unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(
            policy.split(';').map(str::trim).any(|given| given == directive),
            "{directive} in {policy}"
        );
    }
    assert!(!policy.contains("unsafe-"), "{policy}");
    assert!(!policy.contains("http"), "no other origin: {policy}");

    let html = String::from_utf8(docs.body.to_vec()).unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("//cdn"),
        "{html}"
    );
    // Every script has a src on this origin; no inline code or handlers.
    let scripts: Vec<&str> = html.split("<script").skip(1).collect();
    assert_eq!(scripts.len(), 2, "{html}");
    for script in &scripts {
        let (tag, rest) = script.split_once('>').unwrap();
        assert!(tag.contains(" src=\"/"), "{tag}");
        assert!(rest.starts_with("</script>"), "inline script: {script}");
    }
    assert!(!html.contains("onload=") && !html.contains("onerror="), "{html}");
    assert!(!html.contains("style="), "{html}");

    // Everything the page references is served, with the same policy.
    let referenced: Vec<String> = html
        .split(['"', '\''])
        .filter(|part| part.starts_with("/docs/"))
        .map(str::to_owned)
        .collect();
    assert_eq!(referenced.len(), 3, "{referenced:?}");
    for path in &referenced {
        let asset = get(path).await;
        assert_eq!(asset.status, StatusCode::OK, "{path}");
        assert!(asset.body.len() > 100, "{path}");
        assert_eq!(
            header(&asset, "content-security-policy"),
            Some(crate::docs::DOCS_CONTENT_SECURITY_POLICY),
            "{path}"
        );
        let content_type = header(&asset, "content-type").unwrap();
        let cache = header(&asset, "cache-control").unwrap();
        if path.contains(crate::docs::SWAGGER_UI_VERSION) {
            assert_eq!(cache, "public, max-age=31536000, immutable", "{path}");
        } else {
            assert_eq!(cache, "no-cache", "{path}");
        }
        if path.ends_with(".js") {
            assert_eq!(content_type, "text/javascript; charset=utf-8", "{path}");
        } else {
            assert_eq!(content_type, "text/css; charset=utf-8", "{path}");
        }
    }
    let bundle = get(&crate::docs::asset_path("swagger-ui-bundle.js")).await;
    assert!(String::from_utf8_lossy(&bundle.body).contains("SwaggerUIBundle"));
    let init = get("/docs/init.js").await;
    assert!(String::from_utf8_lossy(&init.body).contains("\"/openapi.json\""));
    let license = get(&crate::docs::asset_path("LICENSE")).await;
    assert!(String::from_utf8_lossy(&license.body).contains("Apache License"));
    // The page itself is not cached: it names the assets of this release.
    assert_eq!(header(&docs, "cache-control"), Some("no-store"));
}
