//! `sundial`: the one binary. Server roles (`coordinator`, `worker`, `local`) and client commands
//! that talk to the coordinator's HTTP API.

/// mimalloc: the dataflows allocate and free many small accumulators and rows; glibc's malloc
/// spent a fifth of the time of the window benchmark in its free lists.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod batches;
mod catalog_cmds;
mod client;
mod local;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use sundial_coordinator::membership::Timing;
use sundial_coordinator::CoordinatorConfig;
use sundial_worker::SupervisorConfig;

/// A distributed streaming feature engine on timely and differential dataflow.
#[derive(Parser, Debug)]
#[command(name = "sundial", version, about)]
struct Cli {
    /// The coordinator's HTTP API, for client commands.
    #[arg(long, global = true, env = "SUNDIAL_SERVER", value_name = "URL", default_value = "http://127.0.0.1:7700")]
    server: String,

    /// Log format on stderr (levels come from RUST_LOG, default info).
    #[arg(long, global = true, env = "SUNDIAL_LOG_FORMAT", value_name = "FORMAT", default_value = "human")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

impl LogFormat {
    fn as_arg(self) -> &'static str {
        match self {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the coordinator: membership, catalog and the HTTP API.
    Coordinator(CoordinatorArgs),
    /// Run a worker process that joins the coordinator's cluster.
    Worker(WorkerArgs),
    /// Start a coordinator and N workers on this machine, and stop them all on Ctrl-C.
    Local(local::LocalArgs),
    /// Show the cluster's health.
    Status(client::StatusArgs),
    /// Manage sources.
    #[command(subcommand)]
    Source(catalog_cmds::SourceCmd),
    /// Submit a dataflow definition (JSON, TOML or YAML file).
    Submit {
        /// The definition file.
        file: PathBuf,
    },
    /// Drop a dataflow and free its state.
    Drop {
        /// The dataflow.
        name: String,
    },
    /// List sources and dataflows.
    List,
    /// Send events (CSV with a header, or NDJSON) to a source.
    Ingest(catalog_cmds::IngestArgs),
    /// Read the features of one key.
    Query(catalog_cmds::QueryArgs),
    /// Print every retained window value of a dataflow as NDJSON.
    Export {
        /// The dataflow.
        dataflow: String,
    },
    /// Internal: one generation's timely computation, spawned by `sundial worker`.
    #[command(hide = true)]
    Computation {
        /// The local address to bind for timely data.
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// The worker's data dir (ingest logs, checkpoints).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// When ingest log records are synced.
        #[arg(long, value_name = "POLICY", default_value = "batch")]
        fsync: sundial_worker::log::Fsync,
    },
}

#[derive(Args, Debug)]
struct CoordinatorArgs {
    /// Control port that workers connect to.
    #[arg(long, env = "SUNDIAL_COORDINATOR_LISTEN", value_name = "ADDR", default_value = "127.0.0.1:7701")]
    listen: String,
    /// HTTP API address.
    #[arg(long, env = "SUNDIAL_HTTP", value_name = "ADDR", default_value = "127.0.0.1:7700")]
    http: String,
    /// Number of worker processes in the cluster.
    #[arg(long, env = "SUNDIAL_WORKERS", value_name = "N", default_value_t = 2)]
    workers: usize,
    /// Where the coordinator keeps its state.
    #[arg(long, env = "SUNDIAL_COORDINATOR_DATA_DIR", value_name = "DIR", default_value = "sundial-data/coordinator")]
    data_dir: PathBuf,
    /// How often workers send heartbeats (and the coordinator pings).
    #[arg(long, env = "SUNDIAL_HEARTBEAT_INTERVAL", value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// Silence after which a worker counts as lost.
    #[arg(long, env = "SUNDIAL_HEARTBEAT_TIMEOUT", value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    heartbeat_timeout: Duration,
    /// How often the cluster checkpoints its state (recovery then replays only the ingest log
    /// after the newest checkpoint, and older log segments are deleted).
    #[arg(long, env = "SUNDIAL_CHECKPOINT_INTERVAL", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    checkpoint_interval: Duration,
}

#[derive(Args, Debug)]
struct WorkerArgs {
    /// The coordinator's control address (host:port; host names are resolved).
    #[arg(long, env = "SUNDIAL_COORDINATOR", value_name = "ADDR", default_value = "127.0.0.1:7701")]
    coordinator: String,
    /// Timely worker threads in this process (the same on every worker).
    #[arg(long, env = "SUNDIAL_THREADS", value_name = "T", default_value_t = 2)]
    threads: usize,
    /// Where the worker keeps its identity, log and checkpoints.
    #[arg(long, env = "SUNDIAL_WORKER_DATA_DIR", value_name = "DIR", default_value = "sundial-data/worker")]
    data_dir: PathBuf,
    /// Local address for timely data between processes (port 0 picks a free port).
    #[arg(long, env = "SUNDIAL_WORKER_LISTEN", value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: String,
    /// The address other processes use to reach --listen (HOST or HOST:PORT), when it differs.
    #[arg(long, env = "SUNDIAL_ADVERTISE", value_name = "HOST[:PORT]")]
    advertise: Option<String>,
    /// The worker's HTTP endpoint (port 0 picks a free port): `GET /metrics`, and `POST
    /// /v1/sources/{source}/events`, so that `sundial ingest` sends batches to every worker in
    /// parallel. Bind 0.0.0.0 (with --advertise) for other hosts to reach it.
    #[arg(long, alias = "ingest", env = "SUNDIAL_WORKER_HTTP", value_name = "ADDR", default_value = "127.0.0.1:0")]
    http: String,
    /// Serve a raw TCP line port: a first line `{"source": NAME}`, then NDJSON events; one JSON
    /// reply line per batch.
    #[arg(long, env = "SUNDIAL_WORKER_LINES", value_name = "ADDR")]
    lines: Option<String>,
    /// When ingest log records reach the disk before the reply: `always` (fsync every record),
    /// `batch` (fdatasync once per ingest reply), or `interval:MS` (at most every MS
    /// milliseconds; replies do not wait, so a machine crash can lose that much).
    #[arg(long, env = "SUNDIAL_FSYNC", value_name = "POLICY", default_value = "batch")]
    fsync: sundial_worker::log::Fsync,
}

/// Parses durations such as `500ms`, `1s`, `2m`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let d =
        humantime::parse_duration(text).map_err(|e| format!("{text:?} is not a duration such as 500ms or 5s: {e}"))?;
    if d.is_zero() {
        return Err("the duration must be longer than zero".into());
    }
    Ok(d)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() {
    let cli = Cli::parse();
    let result = run(cli);
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Coordinator(args) => {
            init_logging(cli.log_format);
            run_coordinator(args)
        }
        Command::Worker(args) => {
            init_logging(cli.log_format);
            let config = SupervisorConfig {
                coordinator: args.coordinator,
                threads: args.threads,
                data_dir: args.data_dir,
                listen: args.listen,
                advertise: args.advertise,
                http: Some(args.http),
                lines: args.lines,
                fsync: args.fsync,
                child_program: std::env::current_exe().context("locating the sundial binary")?,
                child_args: vec!["--log-format".into(), cli.log_format.as_arg().into()],
            };
            sundial_worker::run(config)?;
            Ok(())
        }
        Command::Computation { listen, data_dir, fsync } => {
            init_logging(cli.log_format);
            sundial_worker::computation::run(&listen, data_dir, fsync)
        }
        Command::Local(args) => local::run(args, cli.log_format.as_arg()),
        Command::Status(args) => client::status(&cli.server, &args),
        Command::Source(cmd) => catalog_cmds::source(&cli.server, &cmd),
        Command::Submit { file } => catalog_cmds::submit(&cli.server, &file),
        Command::Drop { name } => catalog_cmds::drop(&cli.server, &name),
        Command::List => catalog_cmds::list(&cli.server),
        Command::Ingest(args) => catalog_cmds::ingest(&cli.server, &args),
        Command::Query(args) => catalog_cmds::query(&cli.server, &args),
        Command::Export { dataflow } => catalog_cmds::export(&cli.server, &dataflow),
    }
}

fn run_coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let config = CoordinatorConfig {
        listen: args.listen,
        http: args.http,
        workers: args.workers,
        data_dir: args.data_dir,
        timing: Timing {
            heartbeat_interval: args.heartbeat_interval,
            heartbeat_timeout: args.heartbeat_timeout,
            ..Timing::default()
        },
        checkpoint_interval: args.checkpoint_interval,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let shutdown = async {
            let term = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term => {}
            }
            tracing::info!("shutting down");
        };
        sundial_coordinator::run(config, shutdown).await
    })?;
    Ok(())
}
