//! The composition root: every adapter and module is wired here, and only here.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use keel_db::{Db, DbSettings};
use keel_identity::tokens::{KeySet, TokenService};
use keel_identity::{Identity, IdentitySettings};
use keel_kernel::limit::InProcessRateLimiter;
use keel_kernel::{Bus, BusBuilder, RequestContext};
use tokio::net::TcpListener;
use tonic::transport::Server;
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
            ..IdentitySettings::default()
        };
        let identity = Identity::new(tokens, Arc::new(InProcessRateLimiter::new()), settings);

        let mut bus = BusBuilder::new(db.clone());
        keel_identity::register(&mut bus, &identity);
        let state = State {
            config: Arc::new(config),
            db,
            bus: bus.build(),
            identity,
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
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Application { listener, state } = self;
        let config = state.config.clone();
        let limit = config.max_message_bytes;

        let (health, health_service) = tonic_health::server::health_reporter();
        let readiness = tokio::spawn(watch_database(state.db.clone(), health));

        let (command, query) = keel_identity::grpc::services(&state.bus);
        let mut router = Server::builder()
            .layer(ContextLayer::new(state.identity.clone(), state.db.clone()))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(health_service)
            .add_service(
                command
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(
                query
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            );
        if config.reflection_enabled() {
            let reflection = || {
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(keel_proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            };
            router = router
                .add_service(reflection().build_v1()?)
                .add_service(reflection().build_v1alpha()?);
        }

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut stopped = stop_rx.clone();
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let serve = router.serve_with_incoming_shutdown(incoming, async move {
            let _ = stopped.wait_for(|stop| *stop).await;
            tracing::info!("shutting down: no new connections");
        });
        tokio::pin!(serve);
        let grace = Duration::from_secs(config.shutdown_grace_seconds);
        let mut stop = stop_rx;
        let outcome = tokio::select! {
            outcome = &mut serve => outcome.map_err(anyhow::Error::from),
            _ = async {
                let _ = stop.wait_for(|stop| *stop).await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(grace_seconds = grace.as_secs(), "calls still in flight after the grace period; closing them");
                Ok(())
            }
        };
        readiness.abort();
        if let Err(error) = state.db.clone().close().await {
            tracing::warn!(error = %error, "closing the database pool");
        }
        tracing::info!("stopped");
        outcome
    }
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
