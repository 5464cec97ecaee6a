//! `keel`: thin on purpose. Parse flags, load the configuration, and hand over
//! to the library.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use keel_kernel::Role;
use keel_server::{Application, Config, State, telemetry};

// Many small allocations per call (headers, JSON, protobuf): mimalloc keeps
// them off glibc malloc's locks and consolidation passes.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "keel", version, about = "Keel: typed gRPC, REST and grpc-web backend")]
struct Cli {
    /// A TOML configuration file (default: ./keel.toml when present).
    #[arg(long, global = true, env = "KEEL_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC on KEEL_LISTEN (the default); runs job workers too unless KEEL_JOBS_WORKERS=false.
    Serve,
    /// Run the job workers (and the other background work: event relay, handlers, pruning) without serving the API.
    Worker,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Manage accounts.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Manage signing keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Print the OpenAPI 3.1 document of the REST routes.
    Openapi,
    /// Run the edge alone (REST, Connect, grpc-web, gRPC pass-through) in front of a remote keel.
    Edge {
        /// The gRPC address of the keel tier, e.g. http://10.0.0.5:8080.
        #[arg(long, env = "KEEL_UPSTREAM")]
        upstream: String,
    },
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Create an account; the password is read from a prompt, or from stdin when it is not a terminal.
    Create {
        #[arg(long)]
        email: String,
        #[arg(long, value_enum, default_value_t = RoleArg::User)]
        role: RoleArg,
        #[arg(long)]
        display_name: Option<String>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new signing-key file (for KEEL_AUTH_KEYS_FILE) on stdout.
    Generate,
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    User,
    Moderator,
    Admin,
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Role {
        match role {
            RoleArg::User => Role::User,
            RoleArg::Moderator => Role::Moderator,
            RoleArg::Admin => Role::Admin,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Keys {
        command: KeysCommand::Generate,
    }) = cli.command
    {
        println!("{}", keel_identity::tokens::KeySet::generate_file());
        return Ok(());
    }
    if let Some(Command::Openapi) = cli.command {
        let edge = keel_edge::Edge::new(
            keel_proto::FILE_DESCRIPTOR_SET,
            keel_edge::upstream::unreachable_upstream(),
            0,
        )
        .map_err(|error| anyhow::anyhow!(error))?;
        println!("{}", serde_json::to_string_pretty(edge.openapi())?);
        return Ok(());
    }
    let config = Config::load(cli.config.as_deref())?;
    let telemetry = telemetry::init(&config);
    let outcome = run(cli.command.unwrap_or(Command::Serve), config).await;
    // The spans still queued go out before the process ends.
    if telemetry.exporting() {
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    }
    outcome
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(config).await,
        Command::Worker => worker(config).await,
        Command::Migrate => {
            let db = keel_server::app::connect(&config).await?;
            keel_db::migrate(&db).await.context("applying migrations")?;
            println!("migrations applied ({})", keel_db::backend_name(&db));
            Ok(())
        }
        Command::Users {
            command:
                UsersCommand::Create {
                    email,
                    role,
                    display_name,
                },
        } => {
            let password = read_password()?;
            // A one-shot command: a job it leased would wait out its lease.
            let config = Config {
                jobs_workers: false,
                ..config
            };
            let state = State::build(config).await?;
            let id =
                keel_identity::admin::create_user(&state.bus, &email, &password, display_name.as_deref(), role.into())
                    .await?
                    .id;
            println!("created user {id} ({email}, {})", Role::from(role));
            Ok(())
        }
        Command::Edge { upstream } => edge(config, &upstream).await,
        Command::Keys { .. } | Command::Openapi => Ok(()),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let shutdown = shutdown_signal();
    let started = std::time::Instant::now();
    let app = Application::build(config).await?;
    tracing::info!(
        address = %app.local_addr()?,
        database = keel_db::backend_name(&app.state().db),
        reflection = app.state().config.reflection_enabled(),
        startup_ms = started.elapsed().as_millis() as u64,
        "keel is serving gRPC"
    );
    app.run_until_stopped(shutdown).await
}

/// `keel worker`: the workers whatever `KEEL_JOBS_WORKERS` says (running
/// them is the command's point), no listener; a signal stops them
/// gracefully, as it stops `keel serve`'s.
async fn worker(config: Config) -> anyhow::Result<()> {
    let config = Config {
        jobs_workers: true,
        ..config
    };
    let shutdown = shutdown_signal();
    let started = std::time::Instant::now();
    let state = State::build(config).await?;
    tracing::info!(
        database = keel_db::backend_name(&state.db),
        startup_ms = started.elapsed().as_millis() as u64,
        "keel is running job workers"
    );
    shutdown.await;
    state.stop().await;
    Ok(())
}

async fn edge(config: Config, upstream: &str) -> anyhow::Result<()> {
    let channel = tonic::transport::Channel::from_shared(upstream.to_owned())
        .map_err(|error| anyhow::anyhow!("--upstream {upstream:?}: {error}"))?
        .connect_lazy();
    let channel = tower::ServiceBuilder::new()
        .map_request(keel_server::proxy::forward_client_address::<tonic::body::Body>)
        .service(channel);
    let shedder = std::sync::Arc::new(config.shedder());
    let service = keel_server::app::edge_service(&config, keel_edge::Upstream::new(channel), shedder, None, None)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding KEEL_LISTEN {}", config.listen))?;
    tracing::info!(address = %listener.local_addr()?, upstream, "keel edge is serving");
    keel_server::listen::serve(
        listener,
        service,
        shutdown_signal(),
        keel_server::listen::Limits::from_config(&config)?,
    )
    .await;
    Ok(())
}

/// Resolves at the first SIGTERM or SIGINT (ctrl-c). The handlers are
/// installed when this is called, not when it is first polled: called
/// before start-up, so a signal during start-up (job workers already
/// running) is a graceful stop, not the default kill.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (terminate, interrupt) {
                (Ok(mut terminate), Ok(mut interrupt)) => tokio::select! {
                    _ = terminate.recv() => tracing::info!("SIGTERM received"),
                    _ = interrupt.recv() => tracing::info!("SIGINT received"),
                },
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                    tracing::info!("SIGINT received");
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("ctrl-c received");
    }
}

fn read_password() -> anyhow::Result<String> {
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("password: ")?;
        let second = rpassword::prompt_password("again: ")?;
        anyhow::ensure!(first == second, "the passwords differ");
        first
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    };
    anyhow::ensure!(!password.is_empty(), "no password given");
    Ok(password)
}
