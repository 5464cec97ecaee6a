//! A Rust client of keel: keel-proto's generated gRPC clients over one tonic
//! [`Channel`], with login, the bearer token on every call, and refresh
//! before the access token expires.
//!
//! ```no_run
//! # async fn first_call() -> Result<(), Box<dyn std::error::Error>> {
//! let client = keel_client::Client::connect("http://127.0.0.1:8080").await?;
//! client.login("ada@example.com", "correct horse battery staple").await?;
//! let me = client.identity_queries().get_current_user(keel_client::identity::GetCurrentUserRequest {}).await?;
//! println!("{:?}", me.into_inner().user);
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - [`Client`]: connect, [`Client::login`], [`Client::logout`], and the module
//!   clients ([`Client::identity_commands`], [`Client::events_queries`], ...);
//! - [`AuthChannel`]: the channel those clients run on. It adds
//!   `authorization: Bearer <access token>` to every request once logged in,
//!   and refreshes the token first when it is due. It is a tower service
//!   rather than a `tonic::service::Interceptor` because a refresh is a call
//!   of its own, and tonic's interceptors are synchronous.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderValue;
use keel_proto::events::event_command_service_client::EventCommandServiceClient;
use keel_proto::events::event_query_service_client::EventQueryServiceClient;
use keel_proto::grpc::health::v1::health_client::HealthClient;
use keel_proto::identity::identity_command_service_client::IdentityCommandServiceClient;
use keel_proto::identity::identity_query_service_client::IdentityQueryServiceClient;
use tokio::sync::Mutex;
use tonic::Status;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};

pub use keel_proto;
pub use keel_proto::events;
pub use keel_proto::identity;
/// Reads the `google.rpc` details of a failed call's `Status`
/// (`status.get_details_bad_request()`).
pub use tonic_types::StatusExt;

/// How long before its expiry an access token is refreshed by default (at
/// most half of its lifetime: see [`Client::with_refresh_margin`]).
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// What [`Client::connect`] can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid endpoint: {0}")]
    InvalidEndpoint(#[source] tonic::transport::Error),
    #[error("cannot connect: {0}")]
    Transport(#[source] tonic::transport::Error),
}

/// A keel client: cheap to clone, clones share the channel and the session.
#[derive(Clone, Debug)]
pub struct Client {
    channel: Channel,
    auth: AuthChannel,
}

impl Client {
    /// Connects to `endpoint` (`http://host:port`, or `https://` with the
    /// `tls` features of tonic enabled by the caller).
    pub async fn connect(endpoint: impl Into<String>) -> Result<Client, ConnectError> {
        let endpoint = Endpoint::from_shared(endpoint.into()).map_err(ConnectError::InvalidEndpoint)?;
        let channel = endpoint.connect().await.map_err(ConnectError::Transport)?;
        Ok(Client::from_channel(channel))
    }

    /// A client on a channel the caller configured (TLS, timeouts, lazy
    /// connection).
    pub fn from_channel(channel: Channel) -> Client {
        let session = Arc::new(Session {
            tokens: Mutex::new(None),
            refresher: IdentityCommandServiceClient::new(channel.clone()),
            margin: DEFAULT_REFRESH_MARGIN,
            refreshes: AtomicU64::new(0),
        });
        Client {
            auth: AuthChannel {
                inner: channel.clone(),
                session,
            },
            channel,
        }
    }

    /// Refresh the access token when less than `margin` of its lifetime is
    /// left (or less than half of it, for tokens shorter than `2 * margin`).
    /// Applies to tokens received from now on.
    pub fn with_refresh_margin(self, margin: Duration) -> Client {
        let session = Arc::new(Session {
            tokens: Mutex::new(None),
            refresher: self.auth.session.refresher.clone(),
            margin,
            refreshes: AtomicU64::new(0),
        });
        Client {
            auth: AuthChannel {
                inner: self.channel.clone(),
                session,
            },
            channel: self.channel,
        }
    }

    /// Logs in and keeps the tokens: every module client of this `Client`
    /// (and its clones) calls as this user from now on.
    pub async fn login(&self, email: &str, password: &str) -> Result<identity::User, Status> {
        let response = IdentityCommandServiceClient::new(self.channel.clone())
            .login(identity::LoginRequest {
                email: email.to_owned(),
                password: password.to_owned(),
            })
            .await?
            .into_inner();
        let tokens = Tokens::new(response.tokens, self.auth.session.margin)?;
        *self.auth.session.tokens.lock().await = Some(tokens);
        response
            .user
            .ok_or_else(|| Status::internal("login answered without a user"))
    }

    /// Ends the session on the server, then forgets the tokens.
    pub async fn logout(&self) -> Result<(), Status> {
        self.identity_commands().logout(identity::LogoutRequest {}).await?;
        *self.auth.session.tokens.lock().await = None;
        Ok(())
    }

    /// The current access token, if logged in (refreshed first when due).
    pub async fn access_token(&self) -> Result<Option<String>, Status> {
        let header = self.auth.session.bearer().await?;
        Ok(header
            .and_then(|value| value.to_str().ok().map(str::to_owned))
            .and_then(|value| value.strip_prefix("Bearer ").map(str::to_owned)))
    }

    /// How many times this client refreshed its access token.
    pub fn refreshes(&self) -> u64 {
        self.auth.session.refreshes.load(Ordering::Relaxed)
    }

    /// The authenticated channel, for any other generated client.
    pub fn channel(&self) -> AuthChannel {
        self.auth.clone()
    }

    pub fn identity_commands(&self) -> IdentityCommandServiceClient<AuthChannel> {
        IdentityCommandServiceClient::new(self.channel())
    }

    pub fn identity_queries(&self) -> IdentityQueryServiceClient<AuthChannel> {
        IdentityQueryServiceClient::new(self.channel())
    }

    pub fn events_commands(&self) -> EventCommandServiceClient<AuthChannel> {
        EventCommandServiceClient::new(self.channel())
    }

    pub fn events_queries(&self) -> EventQueryServiceClient<AuthChannel> {
        EventQueryServiceClient::new(self.channel())
    }

    /// `grpc.health.v1.Health`: public, no token.
    pub fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
    }
}

/// A [`Channel`] that adds the session's bearer token to each request.
#[derive(Clone, Debug)]
pub struct AuthChannel {
    inner: Channel,
    session: Arc<Session>,
}

#[derive(Debug)]
struct Session {
    // A tokio mutex, held across the refresh call: callers that find the
    // token due wait for the one refresh instead of each spending the
    // single-use refresh token (a reused one revokes the session).
    tokens: Mutex<Option<Tokens>>,
    refresher: IdentityCommandServiceClient<Channel>,
    margin: Duration,
    refreshes: AtomicU64,
}

struct Tokens {
    bearer: HeaderValue,
    refresh_token: String,
    refresh_at: Instant,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("bearer", &"[redacted]")
            .field("refresh_at", &self.refresh_at)
            .finish_non_exhaustive()
    }
}

impl Tokens {
    fn new(tokens: Option<identity::AuthTokens>, margin: Duration) -> Result<Tokens, Status> {
        let tokens = tokens.ok_or_else(|| Status::internal("the server answered without tokens"))?;
        let mut bearer = HeaderValue::try_from(format!("Bearer {}", tokens.access_token))
            .map_err(|_| Status::internal("the access token is not a valid header value"))?;
        bearer.set_sensitive(true);
        // The server's clock says when the token expires; the lifetime left
        // is measured against ours once, then kept on the monotonic clock.
        let lifetime = tokens
            .access_token_expires_at
            .and_then(|at| SystemTime::try_from(at).ok())
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .unwrap_or_default();
        let refresh_at = Instant::now() + lifetime - margin.min(lifetime / 2);
        Ok(Tokens {
            bearer,
            refresh_token: tokens.refresh_token,
            refresh_at,
        })
    }
}

impl Session {
    /// The `authorization` value to send, refreshing the tokens first when
    /// they are due; `None` when not logged in.
    async fn bearer(&self) -> Result<Option<HeaderValue>, Status> {
        let mut guard = self.tokens.lock().await;
        let Some(tokens) = guard.as_mut() else {
            return Ok(None);
        };
        if Instant::now() >= tokens.refresh_at {
            let response = self
                .refresher
                .clone()
                .refresh_session(identity::RefreshSessionRequest {
                    refresh_token: tokens.refresh_token.clone(),
                })
                .await?
                .into_inner();
            *tokens = Tokens::new(response.tokens, self.margin)?;
            self.refreshes.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Some(tokens.bearer.clone()))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Request<Body>> for AuthChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower::Service::poll_ready(&mut self.inner, cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The ready channel is the one to call; leave a fresh clone behind
        // (tower's rule for services that are called from a future).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let session = self.session.clone();
        Box::pin(async move {
            // A `Status` error reaches the caller as that status: tonic
            // looks for one in the error it gets.
            if let Some(bearer) = session.bearer().await? {
                request.headers_mut().insert(http::header::AUTHORIZATION, bearer);
            }
            tower::Service::call(&mut inner, request).await.map_err(Into::into)
        })
    }
}
