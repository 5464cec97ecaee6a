//! The composition root: every adapter and module is wired here, and only here.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use keel_db::{Db, DbSettings};
use keel_edge::Upstream;
use keel_identity::tokens::{KeySet, TokenService};
use keel_identity::{Identity, IdentityModule, IdentitySettings};
use keel_kernel::grpc::GrpcRoutes;
use keel_kernel::limit::InProcessRateLimiter;
use keel_kernel::{BackgroundTasks, Bus, BusBuilder, GrpcLimits, Module};
use keel_proto::grpc::health::v1::health_check_response::ServingStatus;
use keel_proto::grpc::health::v1::health_server::HealthServer;
use tokio::net::TcpListener;

use crate::config::{Config, Environment};
use crate::health::{HealthService, HealthStatuses};
use crate::layers::ContextLayer;

/// Everything a running keel holds.
#[derive(Clone)]
pub struct State {
    pub config: Arc<Config>,
    pub db: Db,
    pub bus: Bus,
    /// The authenticator of the server's auth layer.
    pub identity: Identity,
    /// Ends streams whose session ended (fed by every committed event).
    pub sessions: keel_identity::access::SessionWatch,
    pub events: keel_events::Events,
    /// Every module, as `State::build` lists them, the events module last.
    pub modules: Arc<[Arc<dyn Module>]>,
    /// Off with `KEEL_METRICS=false`.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The limiter of the per-method limits and identity's sign-in limits
    /// (Redis with its fallback when configured, in process otherwise).
    pub limiter: Arc<dyn keel_kernel::limit::RateLimiter>,
    /// The circuit breakers of outbound targets (the mailer's), shown by
    /// `/readyz` and `/metrics`.
    pub breakers: Arc<[Arc<keel_kernel::outbound::Breaker>]>,
    /// The jobs module, for its graceful shutdown.
    pub jobs: keel_jobs::Jobs,
    tasks: Arc<BackgroundTasks>,
}

/// What the composition root shares with modules: the adapters of the kernel's ports.
struct Ports {
    mailer: Arc<dyn keel_kernel::mail::Mailer>,
    limiter: Arc<dyn keel_kernel::limit::RateLimiter>,
}

fn identity_module(config: &Config, ports: &Ports) -> anyhow::Result<IdentityModule> {
    let keys = match &config.auth_keys_file {
        Some(path) => {
            if config.env == Environment::Production {
                crate::files::check_key_file(path)?;
            }
            KeySet::load(path)?
        }
        None => {
            // Generated 0600; one from an older keel may be wider.
            let path = config.data_dir.join("auth-keys.json");
            crate::files::tighten_if_exists(&path)?;
            KeySet::load_or_generate(&path)?
        }
    };
    let tokens = TokenService::new(
        keys,
        config.auth_issuer.clone(),
        config.auth_audience.clone(),
        Duration::from_secs(config.access_token_ttl_seconds),
    );
    let defaults = IdentitySettings::default();
    let settings = IdentitySettings {
        refresh_grace: chrono::Duration::seconds(config.refresh_grace_seconds as i64),
        register_per_address: keel_kernel::limit::Quota::new(config.register_burst, Duration::from_secs(30)),
        login_per_account_address: keel_kernel::limit::Quota::new(
            config.login_burst_per_account_address,
            Duration::from_secs(60),
        ),
        login_account_pace: keel_kernel::limit::Quota::new(
            config.login_account_burst,
            Duration::from_millis(config.login_account_interval_ms),
        ),
        login_account_max_delay: Duration::from_millis(config.login_account_max_delay_ms),
        password_hash_concurrency: config
            .password_hash_concurrency
            .unwrap_or(defaults.password_hash_concurrency),
        ..defaults
    };
    let identity = Identity::new(tokens, ports.limiter.clone(), settings);
    Ok(IdentityModule::new(identity, ports.mailer.clone()))
}

fn event_settings(config: &Config) -> keel_events::Settings {
    keel_events::Settings {
        redis_url: config.redis_url.as_ref().map(|url| url.expose().clone()),
        deployment: config.deployment.clone(),
        listen: config.events_listen,
        poll: (config.events_poll_ms > 0).then(|| Duration::from_millis(config.events_poll_ms)),
        relay_poll: (config.events_poll_ms > 0).then(|| Duration::from_millis(config.events_poll_ms)),
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
        stream_tickets: keel_events::tickets::Settings {
            first_use: Duration::from_secs(config.stream_ticket_first_use_seconds),
            lifetime: Duration::from_secs(config.stream_ticket_lifetime_seconds),
        },
        ..keel_events::Settings::default()
    }
}

/// The outbound policy of the SMTP relay.
fn mail_policy(config: &Config) -> keel_kernel::outbound::OutboundPolicy {
    keel_kernel::outbound::OutboundPolicy {
        timeout: Duration::from_millis(config.mail_timeout_ms),
        attempts: config.mail_attempts,
        breaker: keel_kernel::outbound::BreakerSettings {
            failures: config.mail_breaker_failures,
            cool_down: Duration::from_millis(config.mail_breaker_cool_down_ms),
        },
        ..keel_kernel::outbound::OutboundPolicy::default()
    }
}

fn job_settings(
    config: &Config,
    limiter: Arc<dyn keel_kernel::limit::RateLimiter>,
) -> anyhow::Result<keel_jobs::Settings> {
    let lease = Duration::from_millis(config.jobs_lease_ms);
    Ok(keel_jobs::Settings {
        workers: config.jobs_workers,
        concurrency: config.jobs_concurrency,
        queues: config.jobs_queue_concurrency()?,
        lease,
        poll: Duration::from_millis(config.jobs_poll_ms),
        // A dead worker's job is rescued within a lease and this; an idle
        // keel pays one rescue query per period (short leases, in tests,
        // rescue quickly).
        rescue_every: (lease * 2).min(Duration::from_secs(60)),
        backoff: keel_kernel::backoff::Backoff::new(
            Duration::from_millis(config.jobs_backoff_ms),
            Duration::from_secs(3600),
        ),
        // The limiter of the per-method limits: Redis is shared by every
        // keel, so a queue's limit holds across processes.
        rate_limits: keel_jobs::RateLimits {
            quotas: config.jobs_rate_limits()?,
            limiter,
        },
        shutdown_grace: config.jobs_shutdown_grace()?,
        cron: config.jobs_cron_entries()?,
        retention: config.jobs_retention()?,
        cancel_grace: Duration::from_millis(config.jobs_cancel_grace_ms),
        watch_per_caller: config.jobs_watch_per_caller,
        vacuum_after: config.jobs_vacuum_after,
        ..keel_jobs::Settings::default()
    })
}

impl State {
    /// Connects, migrates, builds every module and registers it.
    pub async fn build(config: Config) -> anyhow::Result<State> {
        if uses_data_dir(&config) {
            if config.env == Environment::Production {
                crate::files::check_data_dir(&config.data_dir)?;
            }
            crate::files::prepare_data_dir(&config.data_dir)?;
        }
        let db = connect(&config).await?;
        keel_db::migrate(&db).await.context("applying migrations")?;

        // The relay is an outbound call, under its policy and breaker; the
        // mail file is local (its failures are the disk's, retried by the
        // handlers that send).
        let (mailer, breakers): (
            Arc<dyn keel_kernel::mail::Mailer>,
            Vec<Arc<keel_kernel::outbound::Breaker>>,
        ) = match &config.smtp_url {
            Some(url) => {
                let relay = Arc::new(crate::mail::SmtpMailer::new(url.expose(), &config.mail_from)?);
                let outbound = keel_kernel::outbound::Outbound::new("mail", mail_policy(&config));
                let guarded = crate::mail::GuardedMailer::new(relay, outbound);
                let breakers = vec![guarded.breaker().clone()];
                (Arc::new(guarded), breakers)
            }
            None => {
                let path = config
                    .mail_file
                    .clone()
                    .unwrap_or_else(|| config.data_dir.join("mail.jsonl"));
                crate::files::tighten_if_exists(&path)?;
                (Arc::new(crate::mail::FileMailer::new(path)), Vec::new())
            }
        };
        let breakers: Arc<[Arc<keel_kernel::outbound::Breaker>]> = breakers.into();
        let limiter = rate_limiter(&config, &db).await?;
        let ports = Ports {
            mailer,
            limiter: limiter.clone(),
        };
        // The server's auth layer asks identity who is calling.
        let identity = identity_module(&config, &ports)?;

        // Every module of this keel. Adding one is its crate, one line here
        // and its migration in `migrations/`. The events module is not in the
        // list: it runs the others' event handlers, so it starts after them.
        let mut modules: Vec<Arc<dyn Module>> = vec![Arc::new(identity.clone())];
        // The jobs module runs the others' job kinds, so it follows them.
        let kinds = modules.iter().flat_map(|module| module.job_kinds()).collect();
        let job_settings = keel_jobs::Settings {
            schedules: modules.iter().flat_map(|module| module.job_schedules()).collect(),
            breakers: breakers.to_vec(),
            ..job_settings(&config, limiter.clone())?
        };
        let jobs = keel_jobs::Jobs::new(db.clone(), kinds, job_settings).await?;
        modules.push(Arc::new(jobs.clone()));

        let mut handlers = keel_events::handlers::Registry::default();
        for handler in modules.iter().flat_map(|module| module.event_handlers()) {
            handlers.add(handler);
        }
        let events = keel_events::Events::start(db.clone(), event_settings(&config), handlers).await?;
        modules.push(Arc::new(events.clone()));
        // Authentication remembers active sessions once every revocation
        // can reach every process (the events module owns that link).
        if config.access_cache {
            identity.identity().attach_announcer(events.announcer());
        }

        let mut bus = BusBuilder::new(db.clone());
        bus.outbox(events.outbox());
        let idempotency_ttl = Duration::from_secs(config.idempotency_ttl_seconds);
        bus.idempotency(idempotency_ttl);
        if let Some(command) = &config.test_abort_after_commit {
            tracing::warn!(command = %command, "KEEL_TEST_ABORT_AFTER_COMMIT is set: this process aborts after that command commits");
            bus.abort_after_commit(command.clone());
        }
        for module in &modules {
            module.register(&mut bus);
        }
        if let Some(cache) = query_cache(&config, &db).await? {
            bus.query_cache(cache);
        }
        let mut tasks: Vec<_> = modules.iter().flat_map(|module| module.start_tasks(&db)).collect();
        let sessions = keel_identity::access::SessionWatch::new(db.clone());
        tasks.push(watch_sessions(&events, sessions.clone()));
        tasks.push(keel_kernel::idempotency::spawn_pruning(
            db.clone(),
            idempotency_ttl.min(Duration::from_secs(3600)),
        ));
        if config.metrics && config.metrics_pool_timing {
            crate::metrics::time_pool_checkouts();
        }
        let metrics = if config.metrics {
            Some(Arc::new(crate::metrics::Metrics::new(keel_proto::FILE_DESCRIPTOR_SET)?))
        } else {
            None
        };
        let state = State {
            config: Arc::new(config),
            db,
            bus: bus.build(),
            identity: identity.identity().clone(),
            sessions,
            events,
            modules: modules.into(),
            metrics,
            limiter,
            breakers,
            jobs,
            tasks: Arc::new(BackgroundTasks::new(tasks)),
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
        match keel_identity::admin::create_admin_if_missing(&self.bus, email, password.expose()).await? {
            true => tracing::info!(email = %email, "bootstrap admin created"),
            false => tracing::info!(email = %email, "bootstrap admin already exists"),
        }
        Ok(())
    }
}

/// The query cache (`KEEL_QUERY_CACHE`): Redis when `KEEL_REDIS_URL` is
/// set, shared by every process; in process on SQLite (one process); none on
/// PostgreSQL without Redis, where another process's commands could not
/// reach this process's cache. Its keys live under the events' namespace.
async fn query_cache(
    config: &Config,
    db: &Db,
) -> anyhow::Result<Option<Arc<dyn keel_kernel::query_cache::QueryCache>>> {
    if !config.query_cache {
        return Ok(None);
    }
    let ttl = Duration::from_secs(config.query_cache_ttl_seconds);
    if let Some(url) = &config.redis_url {
        let instance = keel_events::store::instance_id(db)
            .await
            .context("reading the database's instance id")?;
        let namespace = format!("{}:{}", config.deployment, instance.simple());
        let redis = crate::query_cache::RedisQueryCache::connect(url.expose(), &namespace, ttl)
            .context("KEEL_REDIS_URL (query cache)")?;
        if !redis.connected(Duration::from_secs(2)).await {
            tracing::warn!("redis is unreachable for the query cache; queries read the database until it is");
        }
        return Ok(Some(Arc::new(redis)));
    }
    if keel_db::backend_name(db) == "sqlite" {
        return Ok(Some(Arc::new(keel_kernel::query_cache::InProcessQueryCache::new(
            ttl, 10_000,
        ))));
    }
    Ok(None)
}

/// The limiter every rate limit counts on: Redis (with
/// `KEEL_RATE_LIMIT_FALLBACK` while it cannot answer) when `KEEL_REDIS_URL`
/// is set and `KEEL_RATE_LIMITER` is `auto` or `redis`, in process otherwise.
/// Its keys live under the events' namespace (deployment and database).
async fn rate_limiter(config: &Config, db: &Db) -> anyhow::Result<Arc<dyn keel_kernel::limit::RateLimiter>> {
    use crate::limit::LimiterKind;
    let url = match (config.rate_limiter, &config.redis_url) {
        (LimiterKind::Auto | LimiterKind::Redis, Some(url)) => url,
        _ => return Ok(Arc::new(InProcessRateLimiter::new())),
    };
    let instance = keel_events::store::instance_id(db)
        .await
        .context("reading the database's instance id")?;
    let namespace = format!("{}:{}", config.deployment, instance.simple());
    let redis = crate::limit::RedisRateLimiter::connect(url.expose(), &namespace)
        .context("KEEL_REDIS_URL (rate limits)")?
        .with_share_max(config.rate_limit_share_max);
    // Counted in Redis from the first call when it is there; if not, the
    // fallback answers until it is.
    if !redis.connected(Duration::from_secs(2)).await {
        tracing::warn!(
            fallback = ?config.rate_limit_fallback,
            "redis is unreachable for rate limits; KEEL_RATE_LIMIT_FALLBACK answers until it is"
        );
    }
    Ok(Arc::new(crate::limit::SharedRateLimiter::new(
        redis,
        config.rate_limit_fallback,
    )))
}

/// Hands every committed event, in order, to the session watch: the events
/// module's hub hears of every process's commits, so a session revoked on
/// another keel ends this one's streams too.
fn watch_sessions(
    events: &keel_events::Events,
    sessions: keel_identity::access::SessionWatch,
) -> tokio::task::JoinHandle<()> {
    let (mut live, _) = events.hub().subscribe();
    tokio::spawn(async move {
        loop {
            match live.recv().await {
                Ok(event) => sessions.observe(&event),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "the session watch fell behind the events; every stream checks its session"
                    );
                    sessions.observe_unknown();
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    })
}

/// Whether keel writes to the data directory: the SQLite database, the
/// generated signing key or the mail file live there by default.
fn uses_data_dir(config: &Config) -> bool {
    config.database_url.is_none()
        || config.auth_keys_file.is_none()
        || (config.smtp_url.is_none() && config.mail_file.is_none())
}

/// Opens the configured database; SQLite in the data directory by default.
pub async fn connect(config: &Config) -> anyhow::Result<Db> {
    let url = match &config.database_url {
        Some(url) => url.expose().clone(),
        None => {
            crate::files::prepare_data_dir(&config.data_dir)?;
            // SQLite creates its `-wal` and `-shm` with the database's mode:
            // a 0600 database makes them 0600 too.
            let database = config.data_dir.join("keel.db");
            crate::files::prepare_private_file(&database)?;
            for suffix in ["-wal", "-shm"] {
                let mut companion = database.clone().into_os_string();
                companion.push(suffix);
                crate::files::tighten_if_exists(std::path::Path::new(&companion))?;
            }
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
        // Every name is known, with the database's status, before the first
        // call: a probe never sees NOT_FOUND for a module that is there.
        let initial = database_status(&state.db).await;
        let services: Vec<&'static str> = state
            .modules
            .iter()
            .flat_map(|module| module.services().iter().copied())
            .collect();
        let health = HealthStatuses::new(services, initial);
        let readiness = tokio::spawn(watch_database(state.db.clone(), health.clone()));

        let service = state.listener_service(health.service())?;
        // At the signal the listener drains its calls and the job workers
        // drain their jobs, side by side: one grace does not follow the other.
        let shutdown = futures::FutureExt::shared(shutdown);
        let jobs = state.jobs.clone();
        let jobs_stopped = {
            let shutdown = shutdown.clone();
            async move {
                shutdown.await;
                jobs.shutdown().await;
            }
        };
        tokio::join!(
            crate::listen::serve(
                listener,
                service,
                shutdown,
                crate::listen::Limits::from_config(&config)?,
            ),
            jobs_stopped
        );

        readiness.abort();
        state.stop().await;
        Ok(())
    }
}

impl State {
    /// Stops what `build` started: the job workers gracefully (see
    /// `keel_jobs::Jobs::shutdown`), then every background task, then the
    /// pool.
    pub async fn stop(&self) {
        self.jobs.shutdown().await;
        self.tasks.stop();
        self.events.stop();
        if let Err(error) = self.db.clone().close().await {
            tracing::warn!(error = %error, "closing the database pool");
        }
        tracing::info!("stopped");
    }
}

impl State {
    /// Every gRPC service behind the request-context layer: what native gRPC,
    /// grpc-web and the REST edge (in process, no socket) all call.
    pub fn grpc_upstream(&self, health_service: HealthServer<HealthService>) -> anyhow::Result<Upstream> {
        let mut grpc = GrpcRoutes::new(GrpcLimits {
            max_message_bytes: self.config.max_message_bytes,
        });
        for module in self.modules.iter() {
            module.grpc(&self.bus, &mut grpc);
        }
        let mut routes = grpc.into_routes().add_service(health_service);
        if self.config.reflection_enabled() {
            // keel's descriptor set holds grpc.health.v1 too.
            let reflection = || {
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(keel_proto::FILE_DESCRIPTOR_SET)
            };
            routes = routes
                .add_service(reflection().build_v1()?)
                .add_service(reflection().build_v1alpha()?);
        }
        let limiting = self.config.rate_limiter != crate::limit::LimiterKind::Off;
        let auth_failures = match self.config.rate_limit_policies()?.authentication() {
            Some(policy) if limiting => Some(Arc::new(crate::limit::AuthFailures::new(
                self.limiter.clone(),
                policy.clone(),
            ))),
            _ => None,
        };
        let rate_limits = limiting
            .then(|| -> anyhow::Result<_> {
                let refusals = self
                    .metrics
                    .clone()
                    .map(|metrics| metrics as Arc<dyn crate::limit::RefusalCounter>);
                Ok(crate::limit::RateLimitLayer::new(
                    self.limiter.clone(),
                    self.config.rate_limit_policies()?,
                    refusals,
                ))
            })
            .transpose()?;
        let layered = tower::ServiceBuilder::new()
            .option_layer(self.metrics.clone().map(crate::metrics::MetricsLayer::new))
            .layer(ContextLayer::new(
                self.identity.clone(),
                Arc::new(self.sessions.clone()),
                self.db.clone(),
                self.config.max_message_bytes,
                self.access_rules()?,
                auth_failures,
            ))
            // Inside the context layer: it reads the caller and address.
            .option_layer(rate_limits)
            .service(routes.prepare());
        Ok(Upstream::new(layered))
    }

    /// Who may call what, and which methods need an idempotency key: the
    /// contracts' options, then `KEEL_IDEMPOTENCY_REQUIRED_METHODS`.
    fn access_rules(&self) -> anyhow::Result<keel_edge::access::AccessRules> {
        let mut rules = keel_edge::access::AccessRules::from_descriptor_set(keel_proto::FILE_DESCRIPTOR_SET)
            .map_err(|error| anyhow::anyhow!("access rules: {error}"))?;
        for method in self.config.idempotency_required_methods() {
            rules.require_idempotency_key(method);
        }
        Ok(rules)
    }

    /// The one listener's service: gRPC, grpc-web, Connect and REST on one
    /// port, and `/metrics` unless it is off.
    pub fn listener_service(
        &self,
        health_service: HealthServer<HealthService>,
    ) -> anyhow::Result<keel_edge::listener::ListenerService> {
        let upstream = self.grpc_upstream(health_service)?;
        let shedder = Arc::new(self.config.shedder());
        let routes = self
            .metrics
            .clone()
            .map(|metrics| crate::metrics::route(metrics, self.clone(), shedder.clone()));
        let breakers = self.breakers.clone();
        let details: keel_edge::ReadinessDetails = Arc::new(move || crate::health::readiness_details(&breakers));
        edge_service(&self.config, upstream, shedder, routes, Some(details))
    }
}

/// The edge in front of `upstream`: the same code in process and for
/// `keel edge --upstream`.
pub fn edge_service(
    config: &Config,
    upstream: Upstream,
    shedder: Arc<keel_edge::shed::Shedder>,
    routes: Option<axum::Router>,
    readiness_details: Option<keel_edge::ReadinessDetails>,
) -> anyhow::Result<keel_edge::listener::ListenerService> {
    let mut edge = keel_edge::Edge::new(
        keel_proto::FILE_DESCRIPTOR_SET,
        upstream.clone(),
        config.max_message_bytes,
    )
    .map_err(|error| anyhow::anyhow!("edge routes: {error}"))?
    .with_shedder(shedder);
    if let Some(routes) = routes {
        edge = edge.with_routes(routes);
    }
    if let Some(details) = readiness_details {
        edge = edge.with_readiness_details(details);
    }
    Ok(keel_edge::listener_service(
        Arc::new(edge),
        &config.cors_settings(),
        &config.security_settings(),
    ))
}

async fn database_status(db: &Db) -> ServingStatus {
    if keel_db::ping(db).await {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Keeps `grpc.health.v1` in step with the database: NOT_SERVING while it is
/// unreachable, for the server ("") and for each module's services by name.
async fn watch_database(db: Db, health: HealthStatuses) {
    let mut last = health.status("");
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let status = database_status(&db).await;
        if last != Some(status) {
            health.set_all(status);
            if status == ServingStatus::NotServing {
                tracing::warn!("database unreachable: health is NOT_SERVING");
            } else {
                tracing::info!("database reachable again: health is SERVING");
            }
            last = Some(status);
        }
    }
}
