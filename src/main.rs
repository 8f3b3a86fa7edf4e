//! The `switchyard` binary: parses flags, loads the config, binds the listeners and hands
//! over to [`switchyard::run`] until SIGTERM or SIGINT.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::net::{TcpListener, TcpSocket};
use tracing_subscriber::EnvFilter;

use switchyard::{Config, Shutdown};

/// A Consul-driven load-balancing HTTP gateway.
///
/// Environment: every key of the config file can be overridden as SWITCHYARD__<KEY> with `__`
/// between levels (e.g. SWITCHYARD__CONSUL__ADDRESS); CONSUL_HTTP_ADDR and CONSUL_HTTP_TOKEN
/// are used when the file leaves consul.address / consul.token out. RUST_LOG sets log levels.
///
/// Signals: SIGTERM or SIGINT stop accepting and drain in-flight requests (server.shutdown_grace);
/// SIGHUP re-reads the config file and applies its services, routes and watch_config (an
/// invalid file is rejected and the running config kept).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Path of the YAML config file.
    #[arg(short, long, default_value = "gateway.yaml", env = "SWITCHYARD_CONFIG")]
    config: PathBuf,
    /// Validate the config and exit: 0 when valid, 2 with the key and the reason otherwise.
    #[arg(long)]
    check: bool,
    /// Print the effective config (after env overrides, secrets masked) and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let config = match load_checked(&cli.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("switchyard: config {}: {error}", cli.config.display());
            return ExitCode::from(2);
        }
    };
    if cli.check {
        println!(
            "switchyard: config {} is valid ({} services)",
            cli.config.display(),
            config.services.len()
        );
        return ExitCode::SUCCESS;
    }
    if cli.print_config {
        println!("{}", config.to_masked_json());
        return ExitCode::SUCCESS;
    }
    match serve(config, cli.config.clone()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("switchyard: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The config, with every file it names read and checked (certificates parse, keys match,
/// not expired; CA bundles and client certificates load), so `--check` and the start refuse
/// them before binding.
fn load_checked(path: &Path) -> Result<Config, Box<dyn std::error::Error>> {
    let config = Config::load(path)?;
    switchyard::check_files(&config)?;
    Ok(config)
}

/// The gateway's socket on `listen`, and with `workers: N > 1` N-1 more on the same address
/// (`SO_REUSEPORT`, so the kernel spreads connections over them) for the extra workers.
fn bind_workers(
    listen: SocketAddr,
    workers: usize,
) -> std::io::Result<(TcpListener, Vec<std::net::TcpListener>)> {
    let reuse_port = workers > 1;
    let first = reuse_port_listener(listen, reuse_port)?;
    // Port 0 (tests): the others join the port the first one got.
    let address = first.local_addr()?;
    let mut extra = Vec::new();
    for _ in 1..workers.max(1) {
        extra.push(reuse_port_listener(address, true)?.into_std()?);
    }
    Ok((first, extra))
}

fn reuse_port_listener(address: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(address)?;
    socket.listen(1024)
}

fn serve(config: Config, config_path: PathBuf) -> anyhow::Result<()> {
    // `workers: 0` is one work-stealing runtime with a thread per core. `workers: N >= 1` is N
    // current-thread runtimes, each with its own SO_REUSEPORT socket on `listen` (this one also
    // runs the admin listener, TLS and the watches): no cross-thread queues and wake-ups.
    let mut runtime = if config.workers == 0 {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let (listener, workers) = bind_workers(config.listen, config.workers)
            .with_context(|| format!("binding `listen` {}", config.listen))?;
        let admin_listener = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| format!("binding `admin_listen` {}", config.admin_listen))?;
        let tls = match &config.tls {
            Some(tls) => Some(
                TcpListener::bind(tls.listen)
                    .await
                    .with_context(|| format!("binding `tls.listen` {}", tls.listen))?,
            ),
            None => None,
        };
        let listeners = switchyard::Listeners {
            gateway: listener,
            admin: admin_listener,
            tls,
            workers,
        };
        let shutdown = Shutdown::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        let (reload_tx, reloads) = tokio::sync::mpsc::channel(4);
        let (poll_tx, poll) = tokio::sync::watch::channel(config.watch_config);
        let reloader = Arc::new(Reloader {
            reloads: reload_tx,
            poll: poll_tx,
            loaded: std::sync::Mutex::new(stamp(&config_path)),
            path: config_path,
        });
        tokio::spawn(reload_on_change(reloader.clone(), poll));
        tokio::spawn(reload_on_sighup(reloader));
        switchyard::run_listeners(config, listeners, shutdown, reloads).await?;
        Ok(())
    })
}

/// Where reloaded configs come from and go: the file, the gateway, and the `watch_config`
/// poll interval of the last valid file (applied on reload, like services).
struct Reloader {
    path: PathBuf,
    reloads: tokio::sync::mpsc::Sender<Config>,
    poll: tokio::sync::watch::Sender<Option<Duration>>,
    /// The file's stamp when it was last read (valid or not), so polling sees later changes.
    loaded: std::sync::Mutex<Option<Stamp>>,
}

/// What polling compares: modification time and size.
type Stamp = (Option<std::time::SystemTime>, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().ok(), m.len()))
}

impl Reloader {
    /// Whether the file changed since it was last read.
    fn changed_since_loaded(&self) -> bool {
        stamp(&self.path) != *self.loaded.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Loads the file and hands it over; an invalid file is logged and the running config
    /// stays. Returns false once the gateway no longer takes reloads.
    async fn reload(&self, cause: &str) -> bool {
        let path = self.path.display();
        *self.loaded.lock().unwrap_or_else(PoisonError::into_inner) = stamp(&self.path);
        match Config::load(&self.path) {
            Ok(config) => {
                tracing::info!(path = %path, cause, "reloading config");
                self.poll.send_if_modified(|poll| {
                    let changed = *poll != config.watch_config;
                    *poll = config.watch_config;
                    changed
                });
                self.reloads.send(config).await.is_ok()
            }
            Err(error) => {
                tracing::error!(path = %path, cause, %error, "config rejected; keeping the running one");
                true
            }
        }
    }
}

/// On each SIGHUP re-reads the config file: a valid one is applied, an invalid one is
/// rejected with a log line naming the key, and the running config stays.
async fn reload_on_sighup(reloader: Arc<Reloader>) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; config reload disabled");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        if !reloader.reload("SIGHUP").await {
            return;
        }
    }
}

/// `watch_config`: reloads when the file's modification time or size changes, polling at the
/// interval `poll` holds (`None`: not at all). A reload that changes `watch_config` takes
/// effect at once. Polling (no inotify crate) is enough at seconds' granularity and also sees
/// a file replaced by a ConfigMap-style symlink swap.
async fn reload_on_change(
    reloader: Arc<Reloader>,
    mut poll: tokio::sync::watch::Receiver<Option<Duration>>,
) {
    loop {
        let Some(interval) = *poll.borrow_and_update() else {
            if poll.changed().await.is_err() {
                return;
            }
            continue;
        };
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = poll.changed() => match changed {
                    Ok(()) => break,
                    Err(_) => return,
                },
                _ = ticks.tick() => {}
            }
            if reloader.changed_since_loaded() && !reloader.reload("file changed").await {
                return;
            }
        }
    }
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
async fn cancel_on_signal(shutdown: Shutdown) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = terminate => tracing::info!("SIGTERM: shutting down"),
    }
    shutdown.cancel();
}
