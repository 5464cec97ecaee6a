//! What a public API's HTTP clients expect beside the payload: compressed
//! REST answers, compressed gRPC messages when asked, and conditional GETs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel_proto::identity as pb;
use keel_proto::identity::identity_query_service_client::IdentityQueryServiceClient;
use keel_testkit::{Backend, TestApp, authed, spawn_app};
use tonic::codec::CompressionEncoding;

async fn get(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> (http::StatusCode, http::HeaderMap, Bytes) {
    let mut builder = http::Request::builder().uri(format!("{}{path}", app.endpoint()));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(builder.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_answers_are_compressed_when_asked_and_large_enough() {
    let app = spawn_app(Backend::Sqlite).await;
    let (status, headers, plain) = get(&app, "/openapi.json", &[]).await;
    assert_eq!(status, 200);
    assert!(headers.get("content-encoding").is_none());
    assert!(plain.len() > 1024);

    let (_, headers, gzipped) = get(&app, "/openapi.json", &[("accept-encoding", "gzip")]).await;
    assert_eq!(headers["content-encoding"], "gzip");
    assert!(gzipped.len() < plain.len() / 2, "{} vs {}", gzipped.len(), plain.len());
    let mut unzipped = Vec::new();
    flate2::read::GzDecoder::new(&gzipped[..])
        .read_to_end(&mut unzipped)
        .unwrap();
    assert_eq!(unzipped, plain);
    for encoding in ["br", "zstd"] {
        let (_, headers, _) = get(&app, "/openapi.json", &[("accept-encoding", encoding)]).await;
        assert_eq!(headers["content-encoding"], encoding);
    }

    // Small answers go as they are.
    let (_, token) = app.signed_in("small@example.com").await;
    let bearer = format!("Bearer {}", token.access_token);
    let (status, headers, _) = get(
        &app,
        "/v1/users/me",
        &[("accept-encoding", "gzip"), ("authorization", &bearer)],
    )
    .await;
    assert_eq!(status, 200);
    assert!(headers.get("content-encoding").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_never_compressed() {
    let app = spawn_app(Backend::Sqlite).await;
    let (_, token) = app.signed_in("stream@example.com").await;
    let bearer = format!("Bearer {}", token.access_token);
    let request = http::Request::builder()
        .uri(format!("{}/v1/events/stream", app.endpoint()))
        .header("authorization", bearer)
        .header("accept", "text/event-stream")
        .header("accept-encoding", "gzip, br, zstd")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert!(
        response.headers().get("content-encoding").is_none(),
        "{:?}",
        response.headers()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_reads_carry_an_etag_and_answer_304_when_it_still_holds() {
    let app = spawn_app(Backend::Sqlite).await;
    let (user, token) = app.signed_in("etag@example.com").await;
    let bearer = format!("Bearer {}", token.access_token);
    let auth = ("authorization", bearer.as_str());
    let (status, headers, body) = get(&app, "/v1/users/me", &[auth]).await;
    assert_eq!(status, 200);
    let tag = headers["etag"].to_str().unwrap().to_owned();
    assert!(tag.starts_with("W/\""), "{tag}");
    // `no-store` would keep a browser from ever revalidating.
    assert_eq!(headers["cache-control"], "private, no-cache");
    let (_, again, _) = get(&app, "/v1/users/me", &[auth]).await;
    assert_eq!(again["etag"], tag.as_str(), "the same representation, the same tag");

    let (status, headers, empty) = get(&app, "/v1/users/me", &[auth, ("if-none-match", &tag)]).await;
    assert_eq!(status, 304);
    assert!(empty.is_empty());
    assert_eq!(headers["etag"], tag.as_str());
    // A strong form of the same tag matches too (weak comparison).
    let strong = tag.trim_start_matches("W/").to_owned();
    let (status, _, _) = get(
        &app,
        "/v1/users/me",
        &[auth, ("if-none-match", &format!("\"other\", {strong}"))],
    )
    .await;
    assert_eq!(status, 304);

    // A change makes a new representation: the old tag no longer holds.
    app.commands()
        .await
        .update_user(authed(
            pb::UpdateUserRequest {
                user: Some(pb::User {
                    id: user.id.clone(),
                    display_name: "Renamed".to_owned(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["display_name".to_owned()],
                }),
            },
            &token.access_token,
        ))
        .await
        .unwrap();
    let (status, headers, body_after) = get(&app, "/v1/users/me", &[auth, ("if-none-match", &tag)]).await;
    assert_eq!(status, 200);
    assert_ne!(headers["etag"], tag.as_str());
    assert_ne!(body_after, body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_messages_are_compressed_with_gzip_or_zstd_when_asked() {
    let app = spawn_app(Backend::Sqlite).await;
    let (_, token) = app.signed_in("compressed@example.com").await;
    for encoding in [CompressionEncoding::Gzip, CompressionEncoding::Zstd] {
        let mut client = IdentityQueryServiceClient::new(app.channel().await)
            .send_compressed(encoding)
            .accept_compressed(encoding);
        let reply = client
            .get_current_user(authed(pb::GetCurrentUserRequest {}, &token.access_token))
            .await
            .unwrap();
        let name = match encoding {
            CompressionEncoding::Gzip => "gzip",
            _ => "zstd",
        };
        assert_eq!(reply.metadata().get("grpc-encoding").unwrap(), name);
        assert_eq!(reply.into_inner().user.unwrap().email, "compressed@example.com");
    }
}
