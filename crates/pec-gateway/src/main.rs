//! The `pec-gateway` command: `serve` a domain from its `gateway.yaml`,
//! `log verify` the legal log's hash chain, `passwd` hash a mailbox password.
#![forbid(unsafe_code)]

use std::{
    io::Read as _,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, RwLock},
    time::Duration,
};

use clap::{Parser, Subcommand};
use pec_core::config::{GatewayConfig, TlsConfig};
use pec_gateway::{
    gateway::Gateway,
    http::{self, Readiness},
    legal_log,
    smtp::{self, Listener},
};
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::{
    TlsAcceptor, rustls,
    rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};

#[derive(Parser)]
#[command(name = "pec-gateway", version, about = "Reference PEC gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the domain described by gateway.yaml.
    Serve {
        /// The configuration the operator renders.
        #[arg(
            long,
            env = "PEC_GATEWAY_CONFIG",
            default_value = "/etc/pec/gateway/gateway.yaml"
        )]
        config: PathBuf,
        /// Log format: text or json.
        #[arg(long, env = "PEC_LOG_FORMAT", default_value = "json")]
        log_format: String,
        /// Jobs run at once (submissions, envelopes, relays), within the
        /// jobs' memory budget of 64 MiB of messages. A job mostly waits
        /// (for syncs, for the other provider's reply), so many run at once.
        #[arg(long, env = "PEC_GATEWAY_WORKERS", default_value_t = 64)]
        workers: usize,
    },
    /// The legal log.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// Hash a mailbox password read from standard input, for the credentials
    /// Secret (`local-part:<hash>`). The password is never an argument.
    Passwd,
}

#[derive(Subcommand)]
enum LogCommand {
    /// Check the hash chain; names the first broken line.
    Verify {
        /// The log file (`legal.log`) or its directory.
        path: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            log_format,
            workers,
        } => serve(config, &log_format, workers),
        Command::Log {
            command: LogCommand::Verify { path },
        } => {
            let file = if path.is_dir() {
                path.join("legal.log")
            } else {
                path
            };
            match legal_log::verify(&file) {
                Ok(lines) => {
                    println!("{}: {lines} lines, chain intact", file.display());
                    ExitCode::SUCCESS
                }
                Err(broken) => {
                    eprintln!("{}: {broken}", file.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Passwd => {
            let mut password = String::new();
            if std::io::stdin().read_to_string(&mut password).is_err() {
                eprintln!("cannot read the password from standard input");
                return ExitCode::FAILURE;
            }
            match pec_gateway::credentials::hash_password(password.trim_end_matches(['\r', '\n'])) {
                Ok(hash) => {
                    println!("{hash}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn serve(path: PathBuf, log_format: &str, workers: usize) -> ExitCode {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if log_format == "text" {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let config = match std::fs::read_to_string(&path)
        .map_err(|e| format!("reading {}: {e}", path.display()))
        .and_then(|text| GatewayConfig::from_yaml(&text))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pec-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pec-gateway: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, workers)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "gateway stopped");
            eprintln!("pec-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Readiness kept current by a background check every two seconds, so a
/// probe never waits on clamd or the HSM.
struct CachedReadiness(RwLock<Result<(), String>>);

impl Readiness for CachedReadiness {
    fn ready(&self) -> Result<(), String> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn tls_acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, String> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let certs = CertificateDer::pem_slice_iter(&read(&tls.cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("TLS certificate {}: {e}", tls.cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", tls.cert_file.display()));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&tls.key_file)?)
        .map_err(|e| format!("TLS key {}: {e}", tls.key_file.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("TLS certificate and key: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn bind(addr: &str, what: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("listening for {what} on {addr}: {e}"))
}

async fn run(config: GatewayConfig, workers: usize) -> Result<(), String> {
    let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
    let access_point =
        config.has_access_point() && config.protocols.iter().any(|p| p == "submissions");
    if access_point && tls.is_none() {
        return Err("the access point (465) needs tls.certFile and tls.keyFile: passwords never cross in clear".into());
    }
    let grace = Duration::from_secs(config.smtp.shutdown_grace_seconds);
    let delay = Duration::from_secs(config.smtp.shutdown_delay_seconds);
    let smtp_addr = config.listen.smtp.clone();
    let submissions_addr = config.listen.submissions.clone();
    let http_addr = config.listen.http.clone();
    let https_addr = config.listen.https.clone();
    let wants_api = config.protocols.iter().any(|p| p == "https");
    if wants_api && tls.is_none() {
        tracing::warn!(
            "the https protocol needs tls.certFile and tls.keyFile; the message API is off"
        );
    }
    let (gateway, jobs) = Gateway::start(config).map_err(|e| e.to_string())?;
    let readiness = Arc::new(CachedReadiness(RwLock::new(Err("starting".into()))));
    let (stop_tx, stop_rx) = watch::channel(false);

    let http_listener = bind(&http_addr, "/metrics and probes").await?;
    let smtp_listener = bind(&smtp_addr, "SMTP").await?;
    let api_listener = match (&tls, wants_api) {
        (Some(_), true) => Some(bind(&https_addr, "the message API").await?),
        _ => None,
    };
    let submission_listener = if access_point {
        Some(bind(&submissions_addr, "submission").await?)
    } else {
        None
    };
    tracing::info!(
        domain = gateway.config.domain,
        smtp = smtp_addr,
        submissions = access_point.then_some(submissions_addr.as_str()),
        http = http_addr,
        generation = gateway.signer.generation(),
        "gateway listening"
    );

    let checker = {
        let gw = gateway.clone();
        let cache = readiness.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut last: Option<Result<(), String>> = None;
            loop {
                let state = gw.readiness().await;
                // Say so when readiness changes, with the reason: the one
                // line an operator needs when a pod stays unready.
                if last.as_ref() != Some(&state) {
                    match &state {
                        Ok(()) => tracing::info!("ready"),
                        Err(reason) => tracing::warn!(reason, "not ready"),
                    }
                    last = Some(state.clone());
                }
                *cache.0.write().unwrap_or_else(|e| e.into_inner()) = state;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.changed() => break,
                }
            }
        })
    };
    let http_task = tokio::spawn(http::serve(
        http_listener,
        gateway.metrics.clone(),
        readiness.clone(),
        stop_rx.clone(),
    ));
    let jobs_task = tokio::spawn(gateway.clone().run_jobs(jobs, workers));
    let mut servers = vec![tokio::spawn(smtp::serve(
        smtp_listener,
        Listener::Incoming,
        tls.clone(),
        gateway.clone(),
        stop_rx.clone(),
    ))];
    if let (Some(l), Some(acceptor)) = (api_listener, tls.clone()) {
        servers.push(tokio::spawn(pec_gateway::api::serve(
            l,
            acceptor,
            gateway.clone(),
            stop_rx.clone(),
        )));
    }
    if let Some(l) = submission_listener {
        servers.push(tokio::spawn(smtp::serve(
            l,
            Listener::Submission,
            tls.clone(),
            gateway.clone(),
            stop_rx.clone(),
        )));
    }

    wait_for_signal().await;
    tracing::info!(
        grace_seconds = grace.as_secs(),
        "stopping: no new sessions, finishing the ones in flight"
    );
    // Not ready at once, so the Service stops sending new connections; but
    // connections its rules still send are taken for `delay` more, until
    // the endpoint is gone from every node.
    checker.abort();
    *readiness.0.write().unwrap_or_else(|e| e.into_inner()) = Err("shutting down".into());
    tokio::time::sleep(delay).await;
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(grace, async {
        for s in servers {
            let _ = s.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("sessions still open at the end of the grace period; closing them");
    }
    jobs_task.abort();
    let _ = http_task.await;
    Ok(())
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the gateway");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
