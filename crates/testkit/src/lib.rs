//! Test helpers: a real keel server on port 0, a fresh database per test,
//! and ready gRPC clients.
//!
//! # Layout
//! - [`Backend`] and [`spawn_app`]: SQLite in a temporary directory, or a
//!   new PostgreSQL schema under `KEEL_TEST_DATABASE_URL`;
//! - [`TestApp`]: the running server, its clients, and call helpers;
//! - [`backend_tests!`]: writes each test once and runs it on every backend.
//!
//! A test that needs PostgreSQL or Redis never passes without it: it carries
//! `#[ignore = "needs PostgreSQL ..."]` (so `cargo test` lists it as
//! ignored), runs with `cargo test -- --include-ignored` (what CI does), and
//! then panics when [`postgres_url`] or [`redis_url`] is unset or the service
//! does not answer.

// Test support: a failed setup step is a failed test, so it panics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use keel_proto::identity as pb;
use keel_proto::identity::identity_command_service_client::IdentityCommandServiceClient;
use keel_proto::identity::identity_query_service_client::IdentityQueryServiceClient;
use keel_server::{Application, Config, State};
use sea_orm::ConnectionTrait;
use tonic::transport::Channel;

pub use keel_proto;

/// A grpc-web transport for generated clients (see [`TestApp::grpc_web`]).
pub type GrpcWeb = tower::util::BoxCloneService<
    http::Request<tonic::body::Body>,
    http::Response<tonic_web::GrpcWebCall<hyper::body::Incoming>>,
    hyper_util::client::legacy::Error,
>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub const PASSWORD: &str = "correct horse battery staple";

/// `KEEL_TEST_DATABASE_URL`. Called only by tests marked
/// `#[ignore = "needs PostgreSQL ..."]`, which run when included; so an
/// unset variable is a failure, never a skip.
pub fn postgres_url() -> String {
    match std::env::var("KEEL_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "this test needs PostgreSQL: set KEEL_TEST_DATABASE_URL (e.g. postgres://postgres@127.0.0.1:5432/test), \
             or run `cargo test` without --include-ignored to skip it"
        ),
    }
}

/// `KEEL_TEST_REDIS_URL`, checked to answer (a Redis `PING`, once per test
/// binary). Like [`postgres_url`]: an unset variable or an unreachable Redis
/// is a failure, never a skip.
pub fn redis_url() -> String {
    let url = match std::env::var("KEEL_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "this test needs Redis: set KEEL_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379), \
             or run `cargo test` without --include-ignored to skip it"
        ),
    };
    static REACHABLE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    if let Err(error) = REACHABLE.get_or_init(|| redis_answers(&url)) {
        panic!("Redis at KEEL_TEST_REDIS_URL ({url}) is unreachable: {error}");
    }
    url
}

/// Sends `PING` and waits for any RESP reply (`+PONG`, or an error such as
/// `-NOAUTH`: either way a Redis is there).
fn redis_answers(url: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::net::{TcpStream, ToSocketAddrs};
    use std::time::Duration;

    let parsed = url::Url::parse(url).map_err(|error| format!("not a URL: {error}"))?;
    let host = parsed.host_str().ok_or("the URL names no host")?;
    let port = parsed.port().unwrap_or(6379);
    let address = (host, port)
        .to_socket_addrs()
        .map_err(|error| format!("{host}:{port}: {error}"))?
        .next()
        .ok_or_else(|| format!("{host}:{port} resolves to no address"))?;
    let timeout = Duration::from_secs(3);
    let mut stream = TcpStream::connect_timeout(&address, timeout).map_err(|error| format!("{address}: {error}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|error| error.to_string())?;
    stream
        .write_all(b"*1\r\n$4\r\nPING\r\n")
        .map_err(|error| format!("{address}: {error}"))?;
    let mut reply = [0_u8; 1];
    stream
        .read_exact(&mut reply)
        .map_err(|error| format!("{address}: no answer to PING: {error}"))?;
    match reply[0] {
        b'+' | b'-' => Ok(()),
        other => Err(format!(
            "{address}: answered PING with {:?}, not RESP",
            char::from(other)
        )),
    }
}

/// A fresh, migrated database without a server: SQLite in a temporary
/// directory, or a new PostgreSQL schema (dropped with the guard).
pub struct TestDatabase {
    pub db: sea_orm::DatabaseConnection,
    _dir: tempfile::TempDir,
    schema: Option<(String, String)>,
}

impl TestDatabase {
    /// PostgreSQL without `KEEL_TEST_DATABASE_URL` panics (see [`postgres_url`]).
    pub async fn new(backend: Backend) -> TestDatabase {
        let dir = tempfile::tempdir().unwrap();
        let (settings, schema) = match backend {
            Backend::Sqlite => (keel_db::DbSettings::new(keel_db::sqlite_url(dir.path())), None),
            Backend::Postgres => {
                let url = postgres_url();
                let name = create_schema(&url).await;
                let settings = keel_db::DbSettings {
                    schema: Some(name.clone()),
                    max_connections: 8,
                    ..keel_db::DbSettings::new(url.clone())
                };
                (settings, Some((url, name)))
            }
        };
        let db = keel_db::connect(&settings).await.unwrap();
        keel_db::migrate(&db).await.unwrap();
        TestDatabase { db, _dir: dir, schema }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Some((url, schema)) = self.schema.take() {
            drop_schema(url, schema);
        }
    }
}

/// A new, empty PostgreSQL schema; its name.
pub async fn create_schema(url: &str) -> String {
    let name = format!("test_{}", uuid::Uuid::now_v7().simple());
    let admin = keel_db::connect(&keel_db::DbSettings::new(url.to_owned()))
        .await
        .unwrap_or_else(|error| panic!("PostgreSQL at KEEL_TEST_DATABASE_URL is unreachable: {error}"));
    admin
        .execute_unprepared(&format!("CREATE SCHEMA \"{name}\""))
        .await
        .unwrap();
    let _ = admin.close().await;
    name
}

/// Drops a test schema (from `Drop`, so on a thread of its own).
pub fn drop_schema(url: String, schema: String) {
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            if let Ok(db) = keel_db::connect(&keel_db::DbSettings::new(url)).await {
                let _ = db
                    // Bounded: a failed test may leave a transaction open on
                    // its runtime, which waits for this drop (left behind
                    // then, rather than hanging the test).
                    .execute_unprepared(&format!(
                        "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                    ))
                    .await;
                let _ = db.close().await;
            }
        });
    })
    .join();
}

/// A running keel with its own database.
pub struct TestApp {
    pub addr: SocketAddr,
    pub state: State,
    pub backend: Backend,
    pub data_dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    schema: Option<(String, String)>,
}

/// Starts keel on `backend`. PostgreSQL without `KEEL_TEST_DATABASE_URL`
/// panics (see [`postgres_url`]).
pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

/// Like [`spawn_app`], with a chance to change the configuration first.
pub async fn spawn_app_with(backend: Backend, configure: impl FnOnce(&mut Config)) -> TestApp {
    // Private, as an operator would make it (production refuses a wider one).
    let data_dir = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .unwrap();
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.path().to_owned(),
        log: std::env::var("KEEL_TEST_LOG").unwrap_or_else(|_| "warn".to_owned()),
        shutdown_grace_seconds: 2,
        database_max_connections: 5,
        ..Config::default()
    };
    let mut schema = None;
    if backend == Backend::Postgres {
        let url = postgres_url();
        let name = create_schema(&url).await;
        config.database_url = Some(keel_server::config::Secret::new(url.clone()));
        config.database_schema = Some(name.clone());
        schema = Some((url, name));
    }
    configure(&mut config);
    config.validate().unwrap();
    keel_server::telemetry::init(&config);
    let app = Application::build(config).await.unwrap();
    let addr = app.local_addr().unwrap();
    let state = app.state().clone();
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp {
        addr,
        state,
        backend,
        data_dir,
        shutdown: Some(shutdown),
        server: Some(server),
        schema,
    }
}

/// A second keel process beside `first`, on its PostgreSQL schema and its
/// Redis, with the same signing keys: what a cluster of two looks like.
pub async fn second_process(first: &TestApp) -> TestApp {
    let schema = first.state.config.database_schema.clone();
    let redis = first.state.config.redis_url.clone();
    let keys = first.data_dir.path().join("auth-keys.json");
    let query_cache = first.state.config.query_cache;
    spawn_app_with(Backend::Postgres, move |config| {
        config.database_schema = schema;
        config.auth_keys_file = Some(keys);
        config.redis_url = redis;
        config.query_cache = query_cache;
    })
    .await
}

impl TestApp {
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// grpc-web over HTTP/1.1 (tonic-web's client layer), the way a
    /// browser calls: hand it to any generated client.
    pub fn grpc_web(&self) -> GrpcWeb {
        let base = self.endpoint();
        let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<tonic_web::GrpcWebCall<tonic::body::Body>>();
        let service = tower::ServiceBuilder::new()
            .map_request(move |mut request: http::Request<tonic::body::Body>| {
                let path = request
                    .uri()
                    .path_and_query()
                    .map(|path| path.as_str().to_owned())
                    .unwrap_or_default();
                *request.uri_mut() = format!("{base}{path}").parse().unwrap();
                request
            })
            .layer(tonic_web::GrpcWebClientLayer::new())
            .service(http);
        tower::util::BoxCloneService::new(service)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint()).unwrap().connect().await.unwrap()
    }

    pub async fn commands(&self) -> IdentityCommandServiceClient<Channel> {
        IdentityCommandServiceClient::new(self.channel().await)
    }

    pub async fn queries(&self) -> IdentityQueryServiceClient<Channel> {
        IdentityQueryServiceClient::new(self.channel().await)
    }

    /// Registers `email` with [`PASSWORD`] and returns the user.
    pub async fn register(&self, email: &str) -> pb::User {
        self.commands()
            .await
            .register(pb::RegisterRequest {
                email: email.to_owned(),
                password: PASSWORD.to_owned(),
                display_name: email.split('@').next().unwrap().to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap()
    }

    /// Logs in with [`PASSWORD`] and returns the tokens.
    pub async fn login(&self, email: &str) -> pb::AuthTokens {
        self.commands()
            .await
            .login(pb::LoginRequest {
                email: email.to_owned(),
                password: PASSWORD.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .tokens
            .unwrap()
    }

    /// `GetCurrentUser` with `access_token`: the caller, or the status.
    pub async fn current_user(&self, access_token: &str) -> Result<pb::User, tonic::Status> {
        self.queries()
            .await
            .get_current_user(authed(pb::GetCurrentUserRequest {}, access_token))
            .await
            .map(|response| response.into_inner().user.unwrap())
    }

    /// Registers and logs in: the user and an access token.
    pub async fn signed_in(&self, email: &str) -> (pb::User, pb::AuthTokens) {
        let user = self.register(email).await;
        (user, self.login(email).await)
    }

    /// Creates an admin through the CLI's code path and logs in.
    pub async fn admin(&self, email: &str) -> (pb::User, pb::AuthTokens) {
        keel_identity::admin::create_user(
            &self.state.bus,
            email,
            PASSWORD,
            Some("Admin"),
            keel_kernel::Role::Admin,
        )
        .await
        .unwrap();
        let tokens = self.login(email).await;
        let user = self
            .queries()
            .await
            .get_current_user(authed(pb::GetCurrentUserRequest {}, &tokens.access_token))
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        (user, tokens)
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some((url, schema)) = self.schema.take() {
            drop_schema(url, schema);
        }
    }
}

/// Reads with `read` every `every` until `done` holds of what it read, and
/// returns that; past `within`, panics with `what` it waited for and the
/// last value read. The polling loop of tests that wait on the database.
pub async fn until<T, F>(
    what: &str,
    within: std::time::Duration,
    every: std::time::Duration,
    mut read: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T
where
    T: std::fmt::Debug,
    F: std::future::Future<Output = T>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        let value = read().await;
        if done(&value) {
            return value;
        }
        assert!(std::time::Instant::now() < deadline, "never {what}: {value:#?}");
        tokio::time::sleep(every).await;
    }
}

/// `message` with `authorization: Bearer <token>`.
pub fn authed<T>(message: T, access_token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {access_token}").parse().unwrap());
    request
}

/// Writes each `async fn name(app: TestApp) { ... }` once and runs it as
/// `sqlite::name` and `postgres::name`; the PostgreSQL variant is
/// `#[ignore]`d and runs with `--include-ignored`.
#[macro_export]
macro_rules! backend_tests {
    ($(async fn $name:ident($app:ident : TestApp) $body:block)*) => {
        mod sqlite {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let $app = $crate::spawn_app($crate::Backend::Sqlite).await;
                    $body
                }
            )*
        }
        mod postgres {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
                async fn $name() {
                    let $app = $crate::spawn_app($crate::Backend::Postgres).await;
                    $body
                }
            )*
        }
    };
}

/// A `#[tokio::test]` per backend for each named `async fn(Backend)`: in
/// `mod sqlite`, and in `mod postgres`, ignored unless asked for
/// (`--include-ignored`; `.ci/run` asks, and fails without PostgreSQL).
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
                async fn $name() {
                    super::$name($crate::Backend::Postgres).await
                }
            )*
        }
    };
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port()
}

/// A `keel` process started from its binary (`env!("CARGO_BIN_EXE_keel")`
/// in the server's tests), on a free loopback port, with a bootstrap admin
/// (`root@example.com`, [`PASSWORD`]) and the given environment over an
/// empty one: what crash tests kill and start again. Killed when dropped.
pub struct KeelProcess {
    child: std::process::Child,
    port: u16,
}

impl Drop for KeelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl KeelProcess {
    /// Starts `binary` on a free port and waits (30 s at most) until it
    /// accepts gRPC.
    pub async fn start(binary: &str, env: &[(&str, String)]) -> KeelProcess {
        KeelProcess::start_on(binary, free_port(), env).await
    }

    /// [`KeelProcess::start`] on `port` (a restart on the port a killed
    /// process had).
    pub async fn start_on(binary: &str, port: u16, env: &[(&str, String)]) -> KeelProcess {
        let mut command = std::process::Command::new(binary);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KEEL_LISTEN", format!("127.0.0.1:{port}"))
            .env("KEEL_LOG", "warn")
            .env("KEEL_LOG_FORMAT", "json")
            .env("KEEL_BOOTSTRAP_ADMIN_EMAIL", "root@example.com")
            .env("KEEL_BOOTSTRAP_ADMIN_PASSWORD", PASSWORD)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        let keel = KeelProcess {
            child: command.spawn().expect("keel starts"),
            port,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while Channel::from_shared(keel.url())
            .expect("a URL")
            .connect()
            .await
            .is_err()
        {
            assert!(std::time::Instant::now() < deadline, "keel did not start");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        keel
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id (to kill it from outside, as an operator would).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("a URL")
            .connect()
            .await
            .expect("keel accepts gRPC")
    }

    /// The bootstrap admin's access token.
    pub async fn admin_token(&self) -> String {
        keel_proto::identity::identity_command_service_client::IdentityCommandServiceClient::new(self.channel().await)
            .login(keel_proto::identity::LoginRequest {
                email: "root@example.com".into(),
                password: PASSWORD.into(),
            })
            .await
            .expect("the bootstrap admin signs in")
            .into_inner()
            .tokens
            .expect("tokens")
            .access_token
    }

    /// Waits (20 s at most) for the process to end on its own.
    pub async fn exited(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("the child's status") {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "keel did not die");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_unreachable_redis_is_an_error_not_a_skip() {
        // Port 1 on loopback: nothing listens there.
        let error = super::redis_answers("redis://127.0.0.1:1").unwrap_err();
        assert!(error.contains("127.0.0.1:1"), "{error}");
        assert!(super::redis_answers("not a url").is_err());
    }
}
