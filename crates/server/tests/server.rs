//! The `keel` binary and the server's own behaviour: CLI, bootstrap admin,
//! production guards, reflection switch, health, graceful shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_proto::identity as pb;
use keel_proto::identity::identity_command_service_client::IdentityCommandServiceClient;
use keel_testkit::{Backend, PASSWORD, spawn_app_with};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

fn keel(data_dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KEEL_DATA_DIR", data_dir)
        .env("KEEL_LOG", "info")
        .env("KEEL_LOG_FORMAT", "json");
    command
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `keel serve` and waits until its health check answers SERVING.
async fn serve(data_dir: &std::path::Path, port: u16) -> Running {
    serve_logging_to(data_dir, port, Stdio::null()).await
}

async fn serve_logging_to(data_dir: &std::path::Path, port: u16, log: impl Into<Stdio>) -> Running {
    serve_with(data_dir, port, log, &[]).await
}

async fn serve_with(data_dir: &std::path::Path, port: u16, log: impl Into<Stdio>, env: &[(&str, &str)]) -> Running {
    let child = keel(data_dir)
        .envs(env.iter().copied())
        .env("KEEL_LISTEN", format!("127.0.0.1:{port}"))
        .env("KEEL_SHUTDOWN_GRACE_SECONDS", "10")
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let running = Running(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            && let Ok(response) = HealthClient::new(channel)
                .check(HealthCheckRequest { service: String::new() })
                .await
        {
            assert_eq!(response.into_inner().status, ServingStatus::Serving as i32);
            return running;
        }
        assert!(Instant::now() < deadline, "keel did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn users_create_reads_the_password_from_stdin_and_the_admin_can_log_in() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut child = keel(data_dir.path())
        .args(["users", "create", "--email", "ops@example.com", "--role", "admin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{PASSWORD}").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("created user"));

    let port = free_port();
    let _server = serve(data_dir.path(), port).await;
    let mut commands = IdentityCommandServiceClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let login = commands
        .login(pb::LoginRequest {
            email: "ops@example.com".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(login.user.unwrap().role, pb::Role::Admin as i32);
}

#[tokio::test]
async fn every_log_line_of_a_call_carries_its_request_id() {
    let data_dir = tempfile::tempdir().unwrap();
    let log_path = data_dir.path().join("keel.log");
    let port = free_port();
    let server = serve_logging_to(data_dir.path(), port, std::fs::File::create(&log_path).unwrap()).await;
    let mut commands = IdentityCommandServiceClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let mut request = tonic::Request::new(pb::RegisterRequest {
        email: "logged@example.com".into(),
        password: PASSWORD.into(),
        display_name: "Logged".into(),
    });
    request
        .metadata_mut()
        .insert("x-request-id", "req-log-check-7".parse().unwrap());
    commands.register(request).await.unwrap();
    drop(server);
    let log = std::fs::read_to_string(&log_path).unwrap();
    let line = log
        .lines()
        .find(|line| line.contains("user registered"))
        .unwrap_or_else(|| panic!("no registration line in {log}"));
    let line: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(line["spans"][0]["request_id"], "req-log-check-7", "{line}");
    assert_eq!(line["spans"][1]["command"], "identity.register", "{line}");
    assert!(!log.contains(PASSWORD), "a password reached the log");
}

#[test]
fn users_create_refuses_a_weak_password() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut child = keel(data_dir.path())
        .args(["users", "create", "--email", "ops@example.com", "--role", "admin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "password").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("password"));
}

#[test]
fn production_refuses_to_start_without_signing_keys() {
    let data_dir = tempfile::tempdir().unwrap();
    let output = keel(data_dir.path())
        .env("KEEL_ENV", "production")
        .arg("serve")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("KEEL_AUTH_KEYS_FILE"), "{stderr}");
    assert!(!data_dir.path().join("auth-keys.json").exists());
}

#[test]
fn invalid_settings_are_named() {
    let data_dir = tempfile::tempdir().unwrap();
    let output = keel(data_dir.path())
        .env("KEEL_LISTEN", "not-an-address")
        .arg("migrate")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("LISTEN"));
    let output = keel(data_dir.path())
        .env("KEEL_DATABASE_URL", "mysql://root:hunter2@localhost/keel")
        .arg("migrate")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("KEEL_DATABASE_URL"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "a secret reached the output: {stderr}");
}

#[test]
fn migrate_applies_the_schema_and_keys_generate_prints_a_usable_key_file() {
    let data_dir = tempfile::tempdir().unwrap();
    let output = keel(data_dir.path()).arg("migrate").output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(data_dir.path().join("keel.db").exists());

    let output = keel(data_dir.path()).args(["keys", "generate"]).output().unwrap();
    assert!(output.status.success());
    let file = String::from_utf8(output.stdout).unwrap();
    assert!(keel_identity::tokens::KeySet::parse(&file).is_ok());
}

#[tokio::test]
async fn the_generated_signing_key_is_private_and_kept_across_restarts() {
    use std::os::unix::fs::PermissionsExt;
    let data_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = serve(data_dir.path(), port).await;
    let key_file = data_dir.path().join("auth-keys.json");
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let before = std::fs::read_to_string(&key_file).unwrap();
    drop(server);
    let _server = serve(data_dir.path(), port).await;
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), before);
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `keel serve` under `umask 000`, which would make every file 0666.
async fn serve_with_open_umask(data_dir: &std::path::Path, port: u16) -> Running {
    let child = Command::new("sh")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KEEL_DATA_DIR", data_dir)
        .env("KEEL_LOG", "info")
        .env("KEEL_LISTEN", format!("127.0.0.1:{port}"))
        .args(["-c", "umask 000 && exec \"$0\" serve", env!("CARGO_BIN_EXE_keel")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let running = Running(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "keel did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running
}

#[tokio::test]
async fn the_data_dir_and_its_files_are_private_whatever_the_umask() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("keel-data");
    let port = free_port();
    let server = serve_with_open_umask(&data_dir, port).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    IdentityCommandServiceClient::new(channel)
        .register(pb::RegisterRequest {
            email: "ada@example.com".into(),
            password: PASSWORD.into(),
            display_name: "Ada".into(),
        })
        .await
        .unwrap();
    // The welcome email is written by an event handler, soon after.
    let mail = data_dir.join("mail.jsonl");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !mail.exists() {
        assert!(Instant::now() < deadline, "no welcome email");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(mode(&data_dir), 0o700);
    for file in ["keel.db", "keel.db-wal", "keel.db-shm", "mail.jsonl", "auth-keys.json"] {
        assert_eq!(mode(&data_dir.join(file)), 0o600, "{file}");
    }
    drop(server);

    // Left open by an older keel or by hand: tightened at start.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    for file in ["keel.db", "mail.jsonl", "auth-keys.json"] {
        std::fs::set_permissions(data_dir.join(file), std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    let _server = serve(&data_dir, port).await;
    assert_eq!(mode(&data_dir), 0o700);
    for file in ["keel.db", "mail.jsonl", "auth-keys.json"] {
        assert_eq!(mode(&data_dir.join(file)), 0o600, "{file}");
    }
}

#[test]
fn production_refuses_a_key_file_that_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let data_dir = tempfile::tempdir().unwrap();
    // The directory is private: only the key file is wrong.
    std::fs::set_permissions(data_dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let keys = data_dir.path().join("keys.json");
    std::fs::write(&keys, keel_identity::tokens::KeySet::generate_file()).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut child = keel(data_dir.path())
        .env("KEEL_ENV", "production")
        .env("KEEL_AUTH_KEYS_FILE", &keys)
        .env("KEEL_LISTEN", "127.0.0.1:0")
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A keel that accepts the file serves on: stop it rather than hang.
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keel started with a key file others can read");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&keys.display().to_string()), "{stderr}");
    assert!(stderr.contains("chmod 600"), "{stderr}");
}

#[tokio::test]
async fn sigterm_lets_the_call_in_flight_finish_then_exits() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    let data_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = serve(data_dir.path(), port).await;
    // A call that is provably in the handler when SIGTERM arrives: with
    // `Expect: 100-continue`, hyper answers `100 Continue` only once the
    // handler reads the body, and the body is sent only after the signal.
    let body = format!(r#"{{"email":"late@example.com","password":"{PASSWORD}","display_name":"Late"}}"#);
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    writer
        .write_all(
            format!(
                "POST /v1/auth/register HTTP/1.1\r\nhost: keel\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nexpect: 100-continue\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .expect("no 100 Continue within 10 s")
        .unwrap();
    assert!(line.starts_with("HTTP/1.1 100"), "{line:?}");
    let mut blank = String::new();
    reader.read_line(&mut blank).await.unwrap();

    let pid = server.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // Once the listener is gone, the signal has been handled.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "keel still accepts connections after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    writer.write_all(body.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_to_string(&mut response))
        .await
        .expect("no response within 10 s")
        .unwrap();
    assert!(
        response.starts_with("HTTP/1.1 201") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    assert!(response.contains("late@example.com"), "{response}");

    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "keel did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
}

async fn reflection_answers(app: &keel_testkit::TestApp) -> bool {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_request::MessageRequest};
    let mut client = ServerReflectionClient::new(app.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let Ok(response) = client.server_reflection_info(tokio_stream::once(request)).await else {
        return false;
    };
    let mut stream = response.into_inner();
    matches!(stream.message().await, Ok(Some(_)))
}

#[tokio::test]
async fn reflection_can_be_turned_off() {
    let on = spawn_app_with(Backend::Sqlite, |_| {}).await;
    assert!(reflection_answers(&on).await);
    let off = spawn_app_with(Backend::Sqlite, |config| config.reflection = Some(false)).await;
    assert!(!reflection_answers(&off).await);
}

/// Every module service answers `Check` by its full name from the first
/// call on, an unknown name is NOT_FOUND, `List` names them all, `Watch`
/// starts with the current status, and reflection describes the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_for_every_module_service() {
    use keel_proto::grpc::health::v1 as health;
    use tokio_stream::StreamExt;
    let app = spawn_app_with(Backend::Sqlite, |_| {}).await;
    let services: Vec<&str> = app
        .state
        .modules
        .iter()
        .flat_map(|module| module.services().iter().copied())
        .collect();
    assert!(
        services.contains(&"keel.identity.v1.IdentityQueryService"),
        "{services:?}"
    );
    assert!(services.contains(&"keel.events.v1.EventCommandService"), "{services:?}");

    // tonic-health's client: what an orchestrator's probe looks like.
    let mut probe = HealthClient::new(app.channel().await);
    for service in std::iter::once("").chain(services.iter().copied()) {
        let answer = probe
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap_or_else(|status| panic!("Check {service:?}: {status:?}"));
        assert_eq!(answer.into_inner().status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = probe
        .check(HealthCheckRequest {
            service: "keel.nothing.v1.NothingService".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut client = health::health_client::HealthClient::new(app.channel().await);
    let listed = client.list(health::HealthListRequest {}).await.unwrap().into_inner();
    let mut names: Vec<&str> = listed.statuses.keys().map(String::as_str).collect();
    names.sort_unstable();
    let mut expected: Vec<&str> = std::iter::once("").chain(services.iter().copied()).collect();
    expected.sort_unstable();
    assert_eq!(names, expected);
    assert!(
        listed
            .statuses
            .values()
            .all(|status| status.status == ServingStatus::Serving as i32)
    );

    let mut watch = client
        .watch(health::HealthCheckRequest {
            service: "keel.identity.v1.IdentityQueryService".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap();
    assert_eq!(first.unwrap().unwrap().status, ServingStatus::Serving as i32);
    let mut unknown_watch = client
        .watch(health::HealthCheckRequest {
            service: "keel.nothing.v1.NothingService".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), unknown_watch.next())
        .await
        .unwrap();
    assert_eq!(first.unwrap().unwrap().status, ServingStatus::ServiceUnknown as i32);

    assert!(reflection_describes(&app, "grpc.health.v1.Health").await);
}

/// Whether reflection finds the file that declares `symbol`.
async fn reflection_describes(app: &keel_testkit::TestApp, symbol: &str) -> bool {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_request::MessageRequest};
    let mut client = ServerReflectionClient::new(app.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.to_owned())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    matches!(
        stream.message().await,
        Ok(Some(response)) if matches!(response.message_response, Some(MessageResponse::FileDescriptorResponse(_)))
    )
}

mod bootstrap_admin {
    use super::*;

    async fn creates_the_admin_once(backend: Backend) {
        let configure = |config: &mut keel_server::Config| {
            config.bootstrap_admin_email = Some("root@example.com".into());
            config.bootstrap_admin_password = Some(keel_server::config::Secret::new(PASSWORD.into()));
        };
        let app = spawn_app_with(backend, configure).await;
        let tokens = app.login("root@example.com").await;
        let me = app
            .queries()
            .await
            .get_current_user(keel_testkit::authed(pb::GetCurrentUserRequest {}, &tokens.access_token))
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        assert_eq!(me.role, pb::Role::Admin as i32);
        // A second start with the same settings keeps the one account.
        let again = keel_server::State::build((*app.state.config).clone()).await.unwrap();
        let page = again
            .bus
            .ask(
                &keel_kernel::RequestContext::system(),
                keel_identity::queries::ListUsers {
                    page_size: 10,
                    page_token: String::new(),
                    query: String::new(),
                    order_by: String::new(),
                },
            )
            .await
            .unwrap();
        assert_eq!(page.users.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        creates_the_admin_once(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
    async fn postgres() {
        creates_the_admin_once(Backend::Postgres).await;
    }
}

#[tokio::test]
async fn keel_edge_serves_rest_and_grpc_in_front_of_a_remote_keel() {
    let data_dir = tempfile::tempdir().unwrap();
    let upstream_port = free_port();
    // Both trust loopback: the test is the edge's proxy, the edge the upstream's.
    let trusted = [("KEEL_TRUSTED_PROXIES", "127.0.0.1")];
    let _upstream = serve_with(data_dir.path(), upstream_port, Stdio::null(), &trusted).await;
    let edge_port = free_port();
    let edge_dir = tempfile::tempdir().unwrap();
    let _edge = Running(
        keel(edge_dir.path())
            .envs(trusted)
            .env("KEEL_LISTEN", format!("127.0.0.1:{edge_port}"))
            .args(["edge", "--upstream", &format!("http://127.0.0.1:{upstream_port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", edge_port)).is_err() {
        assert!(Instant::now() < deadline, "keel edge did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // REST through the standalone edge reaches the remote tier.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let body = serde_json::json!({"email": "edge@example.com", "password": PASSWORD, "displayName": "Edge"});
    let response = client
        .request(
            http::Request::post(format!("http://127.0.0.1:{edge_port}/v1/auth/register"))
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let ready = client
        .request(
            http::Request::get(format!("http://127.0.0.1:{edge_port}/readyz"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "readiness comes from the upstream's health");
    // Native gRPC is passed through: the user exists upstream.
    let mut commands = IdentityCommandServiceClient::connect(format!("http://127.0.0.1:{edge_port}"))
        .await
        .unwrap();
    let login = commands
        .login(pb::LoginRequest {
            email: "edge@example.com".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(login.user.unwrap().email, "edge@example.com");

    // The upstream records the client the edge resolved, not the edge.
    let body = serde_json::json!({"email": "edge@example.com", "password": PASSWORD});
    let response = client
        .request(
            http::Request::post(format!("http://127.0.0.1:{edge_port}/v1/auth/login"))
                .header("content-type", "application/json")
                .header("x-forwarded-for", "6.6.6.6, 203.0.113.9")
                .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let token = body["data"]["tokens"]["accessToken"].as_str().unwrap();
    let mut queries = keel_proto::identity::identity_query_service_client::IdentityQueryServiceClient::connect(
        format!("http://127.0.0.1:{edge_port}"),
    )
    .await
    .unwrap();
    let mut request = tonic::Request::new(pb::ListSessionsRequest {});
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut addresses = queries
        .list_sessions(request)
        .await
        .unwrap()
        .into_inner()
        .sessions
        .into_iter()
        .map(|session| session.ip_address)
        .collect::<Vec<_>>();
    addresses.sort();
    // The gRPC login came from loopback, the REST one from 203.0.113.9.
    assert_eq!(addresses, ["127.0.0.1", "203.0.113.9"]);
}

/// Reads until the peer closes the connection (EOF or reset), up to `within`;
/// what it sent on the way.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(received),
            Ok(Ok(read)) => received.extend_from_slice(&buffer[..read]),
        }
    }
}

/// A keep-alive HTTP/1.1 connection that has been answered once.
async fn answered_connection(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: keel\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    assert!(
        buffer[..read].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buffer[..read])
    );
    stream
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    let app = spawn_app_with(Backend::Sqlite, |config| config.first_byte_timeout_seconds = 1).await;
    let started = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let received = read_until_closed(&mut silent, Duration::from_secs(10))
        .await
        .expect("a silent connection is closed, not kept");
    assert!(received.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before its timeout"
    );
    // A slow request head (slowloris) is cut off the same way.
    let mut slow = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut slow, b"GET /healthz HTTP/1.1\r\nhost: ke")
        .await
        .unwrap();
    assert!(read_until_closed(&mut slow, Duration::from_secs(10)).await.is_some());
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let app = spawn_app_with(Backend::Sqlite, |config| config.max_connections = 2).await;
    let first = answered_connection(app.addr).await;
    let _second = answered_connection(app.addr).await;

    let mut third = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let _ = tokio::io::AsyncWriteExt::write_all(&mut third, b"GET /healthz HTTP/1.1\r\nhost: keel\r\n\r\n").await;
    let received = read_until_closed(&mut third, Duration::from_secs(10))
        .await
        .expect("the connection over the limit is closed");
    assert!(received.is_empty(), "{:?}", String::from_utf8_lossy(&received));

    // A slot frees when a connection ends.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut next = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let _ = next.write_all(b"GET /healthz HTTP/1.1\r\nhost: keel\r\n\r\n").await;
        let mut buffer = [0u8; 64];
        if let Ok(Ok(read)) = tokio::time::timeout(Duration::from_secs(5), next.read(&mut buffer)).await
            && buffer[..read].starts_with(b"HTTP/1.1 200")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freed slot was never given to a new connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_idle_connection_is_closed_but_a_quiet_stream_stays_open() {
    let app = spawn_app_with(Backend::Sqlite, |config| {
        config.idle_timeout_seconds = 2;
        config.events_heartbeat_seconds = 1;
    })
    .await;
    let (_, tokens) = app.signed_in("ada@example.com").await;
    // An SSE stream that receives nothing but heartbeats for longer than
    // the idle timeout.
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "GET /v1/events/stream?afterSequence=1000000 HTTP/1.1\r\nhost: keel\r\naccept: text/event-stream\r\n\
         authorization: Bearer {}\r\n\r\n",
        tokens.access_token
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    let started = Instant::now();
    let mut idle = answered_connection(app.addr).await;
    let closed = read_until_closed(&mut idle, Duration::from_secs(10))
        .await
        .expect("an idle keep-alive connection is closed");
    assert!(closed.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "closed before its idle timeout"
    );
    // An HTTP/2 connection without a stream is closed the same way.
    let socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(socket).await.unwrap();
    let driven = tokio::spawn(connection);
    let request = http::Request::get(format!("{}/healthz", app.endpoint()))
        .body(())
        .unwrap();
    let (response, _) = h2.send_request(request, true).unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
    let _ = tokio::time::timeout(Duration::from_secs(10), driven)
        .await
        .expect("an idle HTTP/2 connection is closed");
    // The stream outlived it, and still delivers heartbeats.
    let mut heartbeats = 0;
    let mut buffer = [0u8; 4096];
    while heartbeats < 2 {
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read(&mut stream, &mut buffer),
        )
        .await
        .expect("the stream stays open")
        .unwrap();
        assert!(read > 0, "the stream was closed");
        heartbeats += String::from_utf8_lossy(&buffer[..read]).matches("heartbeat").count();
    }
}

#[tokio::test]
async fn http2_settings_are_bounded() {
    let app = spawn_app_with(Backend::Sqlite, |config| config.http2_max_concurrent_streams = 7).await;
    let socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (mut client, mut connection) = h2::client::handshake(socket).await.unwrap();
    let request = http::Request::get(format!("{}/healthz", app.endpoint()))
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let response = tokio::select! {
        response = response => response.unwrap(),
        result = &mut connection => panic!("the connection ended first: {result:?}"),
    };
    assert_eq!(response.status(), 200);
    assert_eq!(
        connection.max_concurrent_send_streams(),
        7,
        "SETTINGS_MAX_CONCURRENT_STREAMS"
    );
    // A request head larger than the header list limit is refused.
    let mut large = http::Request::get(format!("{}/healthz", app.endpoint()));
    for index in 0..40 {
        large = large.header(format!("x-padding-{index}"), "x".repeat(1000));
    }
    // Refused: a 431, a reset stream, or the connection closed (h2 sends
    // GOAWAY for a header block it will not decode); never served.
    let served = match client.send_request(large.body(()).unwrap(), true) {
        Ok((response, _)) => tokio::select! {
            response = response => response.ok().map(|response| response.status()),
            _ = &mut connection => None,
        },
        Err(_) => None,
    };
    assert!(
        served.is_none_or(|status| status == 431),
        "a 40 KB header list was answered {served:?}"
    );
}
