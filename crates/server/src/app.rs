//! The composition root: every adapter and module is wired here, and only here.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use keel_db::{Db, DbSettings};
use keel_edge::{CorsSettings, Upstream};
use keel_identity::tokens::{KeySet, TokenService};
use keel_identity::{Identity, IdentitySettings};
use keel_kernel::limit::InProcessRateLimiter;
use keel_kernel::{Bus, BusBuilder, RequestContext};
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::layers::ContextLayer;

/// Everything a running keel holds.
#[derive(Clone)]
pub struct State {
    pub config: Arc<Config>,
    pub db: Db,
    pub bus: Bus,
    pub identity: Identity,
    pub events: keel_events::Events,
}

impl State {
    /// Connects, migrates, loads keys and registers every module.
    pub async fn build(config: Config) -> anyhow::Result<State> {
        let db = connect(&config).await?;
        keel_db::migrate(&db).await.context("applying migrations")?;

        let keys = match &config.auth_keys_file {
            Some(path) => KeySet::load(path)?,
            None => KeySet::load_or_generate(&config.data_dir.join("auth-keys.json"))?,
        };
        let tokens = TokenService::new(
            keys,
            config.auth_issuer.clone(),
            config.auth_audience.clone(),
            Duration::from_secs(config.access_token_ttl_seconds),
        );
        let settings = IdentitySettings {
            refresh_grace: chrono::Duration::seconds(config.refresh_grace_seconds as i64),
            register_per_address: keel_kernel::limit::Quota::new(config.register_burst, Duration::from_secs(30)),
            ..IdentitySettings::default()
        };
        let identity = Identity::new(tokens, Arc::new(InProcessRateLimiter::new()), settings);

        let mailer: Arc<dyn keel_kernel::mail::Mailer> = match &config.smtp_url {
            Some(url) => Arc::new(crate::mail::SmtpMailer::new(url.expose(), &config.mail_from)?),
            None => {
                let path = config
                    .mail_file
                    .clone()
                    .unwrap_or_else(|| config.data_dir.join("mail.jsonl"));
                Arc::new(crate::mail::FileMailer::new(path))
            }
        };
        let mut handlers = keel_events::handlers::Registry::default();
        handlers.add(Arc::new(keel_identity::events::WelcomeEmail::new(mailer)));
        let event_settings = keel_events::Settings {
            redis_url: config.redis_url.as_ref().map(|url| url.expose().clone()),
            subscriptions: keel_events::subscribe::Settings {
                heartbeat: Duration::from_secs(config.events_heartbeat_seconds),
                queue: 256,
            },
            retention: Duration::from_secs(config.events_retention_hours.saturating_mul(3600)),
            handlers: keel_events::handlers::Settings {
                max_attempts: config.event_handler_max_attempts,
                base_backoff: Duration::from_millis(config.event_handler_backoff_ms),
                ..keel_events::handlers::Settings::default()
            },
            ..keel_events::Settings::default()
        };
        let events = keel_events::Events::start(db.clone(), event_settings, handlers).await?;

        let mut bus = BusBuilder::new(db.clone());
        bus.outbox(events.outbox());
        keel_identity::register(&mut bus, &identity);
        keel_events::register(&mut bus, &events);
        let state = State {
            config: Arc::new(config),
            db,
            bus: bus.build(),
            identity,
            events,
        };
        state.bootstrap_admin().await?;
        Ok(state)
    }

    async fn bootstrap_admin(&self) -> anyhow::Result<()> {
        let (Some(email), Some(password)) = (
            &self.config.bootstrap_admin_email,
            &self.config.bootstrap_admin_password,
        ) else {
            return Ok(());
        };
        match crate::users::create_admin_if_missing(&self.bus, email, password.expose()).await? {
            true => tracing::info!(email = %email, "bootstrap admin created"),
            false => tracing::info!(email = %email, "bootstrap admin already exists"),
        }
        Ok(())
    }
}

/// Opens the configured database; SQLite in the data directory by default.
pub async fn connect(config: &Config) -> anyhow::Result<Db> {
    let url = match &config.database_url {
        Some(url) => url.expose().clone(),
        None => {
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("creating KEEL_DATA_DIR {}", config.data_dir.display()))?;
            keel_db::sqlite_url(&config.data_dir)
        }
    };
    let settings = DbSettings {
        max_connections: config.database_max_connections,
        schema: config.database_schema.clone(),
        ..DbSettings::new(url)
    };
    keel_db::connect(&settings)
        .await
        .context("connecting to the database (KEEL_DATABASE_URL)")
}

/// A bound, ready server: build it, read its address, then run it.
pub struct Application {
    listener: TcpListener,
    state: State,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        let listen = config.listen;
        let state = State::build(config).await?;
        Self::with_state(listen, state).await
    }

    pub async fn with_state(listen: SocketAddr, state: State) -> anyhow::Result<Application> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding KEEL_LISTEN {listen}"))?;
        Ok(Application { listener, state })
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight
    /// calls finish within the grace period, and closes the pool.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Application { listener, state } = self;
        let config = state.config.clone();
        let (health, health_service) = tonic_health::server::health_reporter();
        let readiness = tokio::spawn(watch_database(state.db.clone(), health));

        let service = state.listener_service(health_service)?;
        crate::listen::serve(
            listener,
            service,
            shutdown,
            Duration::from_secs(config.shutdown_grace_seconds),
        )
        .await;

        readiness.abort();
        state.events.stop();
        if let Err(error) = state.db.clone().close().await {
            tracing::warn!(error = %error, "closing the database pool");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

impl State {
    /// Every gRPC service behind the request-context layer: what native gRPC,
    /// grpc-web and the REST edge (in process, no socket) all call.
    pub fn grpc_upstream(
        &self,
        health_service: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ) -> anyhow::Result<Upstream> {
        let limit = self.config.max_message_bytes;
        // Every service gets the same explicit message-size limits.
        macro_rules! limited {
            ($service:expr) => {
                $service
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit)
            };
        }
        let (command, query) = keel_identity::grpc::services(&self.bus);
        let (event_command, event_query) = keel_events::grpc::services(&self.bus);
        let mut routes = Routes::new(health_service)
            .add_service(limited!(command))
            .add_service(limited!(query))
            .add_service(limited!(event_command))
            .add_service(limited!(event_query));
        if self.config.reflection_enabled() {
            let reflection = || {
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(keel_proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            };
            routes = routes
                .add_service(reflection().build_v1()?)
                .add_service(reflection().build_v1alpha()?);
        }
        let layered = tower::ServiceBuilder::new()
            .layer(ContextLayer::new(self.identity.clone(), self.db.clone(), limit))
            .service(routes.prepare());
        Ok(Upstream::new(layered))
    }

    /// The one listener's service: gRPC, grpc-web and REST on one port.
    pub fn listener_service(
        &self,
        health_service: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ) -> anyhow::Result<keel_edge::listener::ListenerService> {
        let upstream = self.grpc_upstream(health_service)?;
        edge_service(&self.config, upstream)
    }
}

/// The edge in front of `upstream`: the same code in process and for
/// `keel edge --upstream`.
pub fn edge_service(config: &Config, upstream: Upstream) -> anyhow::Result<keel_edge::listener::ListenerService> {
    let edge = keel_edge::Edge::new(
        keel_proto::FILE_DESCRIPTOR_SET,
        upstream.clone(),
        config.max_message_bytes,
    )
    .map_err(|error| anyhow::anyhow!("edge routes: {error}"))?;
    let cors = CorsSettings {
        allowed_origins: config.cors_origins(),
    };
    Ok(keel_edge::one_listener(&upstream, Arc::new(edge).router(), &cors))
}

/// Keeps `grpc.health.v1` in step with the database: NOT_SERVING while it is unreachable.
async fn watch_database(db: Db, health: tonic_health::server::HealthReporter) {
    let mut last = None;
    loop {
        let status = if keel_db::ping(&db).await {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            health.set_service_status("", status).await;
            if status == ServingStatus::NotServing {
                tracing::warn!("database unreachable: health is NOT_SERVING");
            }
            last = Some(status);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// A context for the CLI and start-up work: trusted, no principal.
pub fn system_context() -> RequestContext {
    RequestContext::system()
}
