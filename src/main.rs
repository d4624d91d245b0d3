//! The `pec-operator` command: `run` the controllers, or print the `crds`.
#![deny(unsafe_code)]

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use clap::{Parser, Subcommand};
use kube::{Api, Client};
use pec_operator::{
    api,
    clock::{Clock, OffsetClock, SystemClock},
    controllers::{self, Context},
    http::{self, Probe},
    leader::{Elector, Tenure, Timing},
    metrics::Metrics,
    telemetry::{self, LogFormat},
};

mod heap;

/// jemalloc, which returns freed pages to the system (see README, crates).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, which it reads when it starts, before `main`:
/// - `background_thread`: a thread of its own gives freed pages back as
///   they age. Without it jemalloc does so only while the same arena keeps
///   allocating, and an operator that has converged and sits idle keeps
///   what its last reconciles freed.
/// - `narenas:1`: one arena rather than four per CPU, so the partly used
///   pages of every size are not kept once per arena. The operator's hot
///   paths are I/O bound; its threads' own caches take most allocations
///   without touching the arena.
///
/// With 1,000 domains, what the allocator holds beyond the live heap went
/// from 14.3 MiB to 8.8-9.9 MiB, and the settled resident memory from
/// 54.9-55.8 MiB to 52.6-54.0 MiB (the rollout benchmark; README, crates).
/// The `_RJEM_MALLOC_CONF` environment variable still overrides these.
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&'static std::ffi::c_char> =
    // SAFETY: the pointer is to the first byte of a NUL-terminated static
    // string, valid for the whole program; jemalloc only reads it.
    Some(unsafe { &*c"background_thread:true,narenas:1".as_ptr() });

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Also a kubectl plugin: installed (or linked) as `kubectl-pec` on the
/// PATH, `kubectl pec sla report -n NS` runs it.
#[derive(Parser)]
#[command(
    name = "pec-operator",
    version,
    about = "Kubernetes operator for a multi-site PEC platform (also `kubectl pec` when installed as kubectl-pec)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every controller (only the replica holding the leader Lease reconciles).
    Run(RunArgs),
    /// SLA tools for people on call.
    Sla {
        #[command(subcommand)]
        command: SlaCommand,
    },
    /// HSM key tools for people. The PIN is read from PEC_HSM_PIN, never from
    /// an argument (arguments are visible to every process on the machine).
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Print the operational alerting rules (certificates, signing keys,
    /// sites, domains, the operator itself) for Prometheus.
    Rules(RuleArgs),
    /// Check that a running operator answers: GET `URL` (plain HTTP, such as
    /// the metrics Service's `/metrics`) must give 200 and the Prometheus text
    /// format. The chart's `helm test` runs this.
    Check {
        /// `http://HOST:PORT/PATH`.
        url: String,
    },
    /// Print the CustomResourceDefinitions as YAML, or write one file per kind.
    Crds {
        /// Write `<kind>.yaml` files into this directory (repeatable) instead of printing.
        #[arg(long)]
        out_dir: Vec<PathBuf>,
    },
}

/// What generated alerting rules say besides their expressions.
#[derive(clap::Args)]
struct RuleArgs {
    /// Where docs/runbooks.md is served; each alert links `<URL>#<alert>`.
    #[arg(long, default_value = pec_operator::alerts::DEFAULT_RUNBOOK_BASE)]
    runbook_base_url: String,
    /// The severity label of alerts that need a person now.
    #[arg(long, default_value = "critical")]
    critical: String,
    /// The severity label of alerts that need a person today.
    #[arg(long, default_value = "warning")]
    warning: String,
}

impl RuleArgs {
    fn options(self) -> pec_operator::alerts::Options {
        pec_operator::alerts::Options {
            runbook_base: self.runbook_base_url,
            critical: self.critical,
            warning: self.warning,
        }
    }
}

#[derive(Subcommand)]
enum SlaCommand {
    /// Print where every SlaTarget stands: current and past periods.
    Report {
        /// This namespace (default: the kubeconfig context's).
        #[arg(long, short = 'n', conflicts_with = "all_namespaces")]
        namespace: Option<String>,
        /// Every namespace.
        #[arg(long, short = 'A')]
        all_namespaces: bool,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "text")]
        output: ReportFormat,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Print the Prometheus alerting rules for SLA burn rates and outages.
    Rules(RuleArgs),
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Export a private key generated with `export: Wrapped`, wrapped (AES key
    /// wrap with padding, RFC 5649) under a key-encryption key that stays in
    /// the same token; the KEK is generated there if the label is new. Keys
    /// generated with `export: Never` refuse. There is no plaintext export.
    ExportWrapped {
        /// The PKCS#11 module.
        #[arg(long, env = "PEC_PKCS11_MODULE")]
        module: PathBuf,
        /// Label of the token.
        #[arg(long)]
        token: String,
        /// The key's CKA_ID in hex (status.current.keyId of the SigningKey).
        #[arg(long)]
        key_id: String,
        /// Label of the key-encryption key in the token.
        #[arg(long)]
        kek: String,
        /// Where to write the wrapped key.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ReportFormat {
    Text,
    Json,
    Yaml,
}

/// Which cluster a command talks to, as kubectl says it.
#[derive(clap::Args)]
struct ClusterArgs {
    /// The kubeconfig file (default: $KUBECONFIG, else ~/.kube/config, else
    /// the pod's service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    #[arg(long)]
    context: Option<String>,
}

impl ClusterArgs {
    /// A client for the chosen cluster.
    async fn client(&self) -> Result<Client, BoxError> {
        use kube::config::{KubeConfigOptions, Kubeconfig};
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..KubeConfigOptions::default()
        };
        let config = match (&self.kubeconfig, &self.context) {
            (Some(path), _) => {
                kube::Config::from_custom_kubeconfig(Kubeconfig::read_from(path)?, &options).await?
            }
            (None, Some(_)) => kube::Config::from_kubeconfig(&options).await?,
            (None, None) => kube::Config::infer().await?,
        };
        Ok(Client::try_from(config)?)
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "PEC_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "PEC_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Namespace of the leader Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "pec-system")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "PEC_LEASE_NAME", default_value = "pec-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (default: pod name, else host and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// The PKCS#11 module that reaches the HSM (for SoftHSM2 on Debian,
    /// /usr/lib/softhsm/libsofthsm2.so). Without it SigningKeys report
    /// HsmModuleUnavailable.
    #[arg(long, env = "PEC_PKCS11_MODULE")]
    pkcs11_module: Option<PathBuf>,
    /// The gateway image for MailDomains that name none (default: the
    /// reference gateway of this version).
    #[arg(long, env = "PEC_GATEWAY_IMAGE")]
    gateway_image: Option<String>,
    /// The PKCS#11 module inside the gateway image.
    #[arg(
        long,
        env = "PEC_GATEWAY_PKCS11_MODULE",
        default_value = "/usr/lib/softhsm/libsofthsm2.so"
    )]
    gateway_pkcs11_module: String,
    /// A PersistentVolumeClaim holding SoftHSM2's token directory, mounted
    /// into every gateway pod (leave unset for a network HSM).
    #[arg(long, env = "PEC_GATEWAY_HSM_TOKEN_CLAIM")]
    gateway_hsm_token_claim: Option<String>,
    /// The platform's clamd (`tcp:HOST:PORT` or `unix:PATH`), for
    /// MailDomains whose `antivirus.clamd` is left out.
    #[arg(
        long,
        env = "PEC_GATEWAY_CLAMD",
        default_value = controllers::mail_domain::gateway::DEFAULT_CLAMD
    )]
    gateway_clamd: String,
    /// Secrets (comma-separated names, in each MailDomain's namespace) the
    /// gateway pods pull their image with.
    #[arg(long, env = "PEC_GATEWAY_IMAGE_PULL_SECRETS", value_delimiter = ',')]
    gateway_image_pull_secrets: Vec<String>,
    /// Seconds between reconciles of a MailDomain or SigningKey that nothing
    /// triggers: the safety net under the watches.
    #[arg(long, env = "PEC_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// Reconciles each controller runs at once. More converge a large
    /// platform sooner on a roomy control plane; fewer spare a small one
    /// (the Lease renewals share it).
    #[arg(long, env = "PEC_MAX_CONCURRENT_RECONCILES", default_value_t = controllers::DEFAULT_CONCURRENCY)]
    max_concurrent_reconciles: u16,
    /// Milliseconds the MailDomain controller waits for a domain to stop
    /// changing before it reconciles it: the burst of changes a rollout
    /// makes (each gateway pod turning ready) becomes one reconcile. 0, the
    /// default, reconciles at every change: the wait restarts with each
    /// change, so a domain changing faster than it would never be reconciled.
    #[arg(long, env = "PEC_RECONCILE_DEBOUNCE_MS", default_value_t = controllers::DEFAULT_DEBOUNCE.as_millis() as u64)]
    reconcile_debounce_ms: u64,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    match Cli::parse().command {
        Command::Crds { out_dir } => print_crds(&out_dir),
        Command::Check { url } => check(&url).await,
        Command::Run(args) => run(args).await,
        Command::Sla {
            command:
                SlaCommand::Report {
                    namespace,
                    all_namespaces,
                    output,
                    cluster,
                },
        } => sla_report(&cluster, namespace, all_namespaces, output).await,
        Command::Key {
            command:
                KeyCommand::ExportWrapped {
                    module,
                    token,
                    key_id,
                    kek,
                    out,
                },
        } => export_wrapped(&module, &token, &key_id, &kek, &out),
        Command::Sla {
            command: SlaCommand::Rules(args),
        } => {
            print!("{}", pec_operator::sla::rules::yaml(&args.options())?);
            Ok(())
        }
        Command::Rules(args) => {
            print!("{}", pec_operator::alerts::yaml(&args.options())?);
            Ok(())
        }
    }
}

fn export_wrapped(
    module: &std::path::Path,
    token: &str,
    key_id: &str,
    kek: &str,
    out: &std::path::Path,
) -> Result<(), BoxError> {
    let id = pec_operator::signing::x509::from_hex(key_id)
        .ok_or("--key-id must be hex, as in status.current.keyId")?;
    let pin =
        std::env::var("PEC_HSM_PIN").map_err(|_| "set PEC_HSM_PIN to the token's user PIN")?;
    let hsm = pec_operator::hsm::Hsm::open(module)?;
    let session = hsm.login(token, &cryptoki::types::AuthPin::from(pin))?;
    let kek = session.ensure_kek(kek)?;
    let wrapped = session.wrap(kek, &id)?;
    std::fs::write(out, &wrapped)?;
    println!(
        "wrote {} bytes of wrapped key to {}",
        wrapped.len(),
        out.display()
    );
    Ok(())
}

fn print_crds(out_dirs: &[PathBuf]) -> Result<(), BoxError> {
    for (file, crd) in api::crds() {
        let yaml = api::crd_yaml(&crd)?;
        if out_dirs.is_empty() {
            print!("---\n{yaml}");
        }
        for dir in out_dirs {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join(file), &yaml)?;
        }
    }
    Ok(())
}

/// `check URL`: one HTTP/1.0 GET; 200 with a Prometheus text Content-Type
/// passes, anything else fails with what was answered.
async fn check(url: &str) -> Result<(), BoxError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or("check takes an http:// URL")?;
    let (address, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::net::TcpStream::connect(address),
    )
    .await
    .map_err(|_| format!("connecting to {address} timed out"))??;
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    stream
        .write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let answer = String::from_utf8_lossy(&answer);
    let head = answer.split("\r\n\r\n").next().unwrap_or_default();
    let status_ok = head.lines().next().is_some_and(|l| l.contains(" 200 "));
    let text_format = head
        .to_ascii_lowercase()
        .contains("content-type: text/plain; version=0.0.4");
    if status_ok && text_format {
        println!("{url}: 200, Prometheus text format");
        Ok(())
    } else {
        Err(format!("{url} answered: {head}").into())
    }
}

/// `sla report`: in `namespace`, else every namespace with `all`, else the
/// kubeconfig context's namespace, as kubectl chooses.
async fn sla_report(
    cluster: &ClusterArgs,
    namespace: Option<String>,
    all: bool,
    output: ReportFormat,
) -> Result<(), BoxError> {
    let client = cluster.client().await?;
    let api: Api<api::SlaTarget> = if all {
        Api::all(client)
    } else {
        let ns = namespace.unwrap_or_else(|| client.default_namespace().to_string());
        Api::namespaced(client, &ns)
    };
    let targets = api.list(&Default::default()).await?.items;
    match output {
        ReportFormat::Text => print!("{}", pec_operator::sla::report::text(&targets)),
        ReportFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&pec_operator::sla::report::json(&targets))?
        ),
        ReportFormat::Yaml => print!(
            "{}",
            serde_yaml::to_string(&pec_operator::sla::report::json(&targets))?
        ),
    }
    Ok(())
}

async fn run(args: RunArgs) -> Result<(), BoxError> {
    telemetry::init(args.log_format);
    // Kept: the Lease's renewals make a client of their own from it.
    let config = kube::Config::infer().await?;
    let client = Client::try_from(config.clone())?;
    let metrics = Metrics::new()?;
    metrics.install("heap", heap::HeapCollector::new());
    let ready = Arc::new(AtomicBool::new(false));
    let (addr, server) = http::serve(
        args.metrics_addr,
        Probe {
            ready: ready.clone(),
            metrics: metrics.clone(),
        },
    )
    .await?;
    tokio::spawn(server);
    let identity = args.identity.unwrap_or_else(default_identity);
    tracing::info!(%addr, %identity, "serving /metrics, /healthz and /readyz");

    let hsm = match &args.pkcs11_module {
        Some(module) => match pec_operator::hsm::Hsm::open(module) {
            Ok(hsm) => Some(Arc::new(hsm)),
            Err(e) => {
                tracing::error!(error = %e, "the PKCS#11 module did not load; SigningKeys will report it");
                None
            }
        },
        None => None,
    };
    let defaults = controllers::mail_domain::gateway::GatewayDefaults::default();
    let gateway_defaults = controllers::mail_domain::gateway::GatewayDefaults {
        image: args.gateway_image.clone().unwrap_or(defaults.image),
        pkcs11_module: args.gateway_pkcs11_module.clone(),
        token_claim: args.gateway_hsm_token_claim.clone(),
        clamd: args.gateway_clamd.clone(),
        image_pull_secrets: args.gateway_image_pull_secrets.clone(),
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // The controllers' clock; the Lease keeps the wall clock.
    let controllers_clock: Arc<dyn Clock> = match OffsetClock::from_env()? {
        Some(moved) => {
            tracing::warn!(now = %moved.now(), "PEC_CLOCK_START moves the controllers' clock: for tests only");
            Arc::new(moved)
        }
        None => clock.clone(),
    };
    let timing = Timing::default();
    let leases = Api::namespaced(client.clone(), &args.lease_namespace);
    let mut elector = Elector::new(leases, &args.lease_name, &identity, timing);
    let campaign = async {
        loop {
            match elector.try_acquire_or_renew(clock.as_ref()).await {
                Ok(true) => return,
                Ok(false) => ready.store(true, Ordering::Relaxed),
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(timing.retry_period).await;
        }
    };
    tokio::select! {
        () = campaign => {}
        () = shutdown_signal() => {
            tracing::info!("shutting down before becoming leader");
            return Ok(());
        }
    }
    ready.store(true, Ordering::Relaxed);
    metrics.leader.set(1);
    tracing::info!(lease = %args.lease_name, "became leader; starting controllers");

    let ctx = Arc::new(
        Context::new(
            client,
            controllers_clock,
            metrics.clone(),
            elector.identity(),
        )
        .with_hsm(hsm)
        .with_gateway_defaults(gateway_defaults)
        .with_resync(std::time::Duration::from_secs(args.resync_seconds))
        .with_concurrency(args.max_concurrent_reconciles)
        .with_debounce(std::time::Duration::from_millis(args.reconcile_debounce_ms)),
    );
    // The controllers stop by themselves on SIGTERM or Ctrl-C. The Lease is
    // renewed on a thread of its own meanwhile, and released when they stop.
    let lost = elector.lead(config, clock, controllers::run(ctx)).await == Tenure::Lost;
    metrics.leader.set(0);
    if lost {
        tracing::error!("lost leadership; exiting so no two replicas reconcile at once");
        exit_or_abort(1);
    }
    tracing::info!("stopped");
    Ok(())
}

/// How long [`exit_or_abort`] lets `exit` take.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Exits with `code`, or aborts if the exit has not ended the process
/// within [`EXIT_GRACE`]. `std::process::exit`, called on a runtime worker
/// after leadership was lost, was seen to hang in CI (2 of 5 runs of the
/// control-plane tests; the cause is not found): the replica had stopped
/// leading but never ended, so it was never restarted. An abort cannot be
/// held up that way.
fn exit_or_abort(code: i32) -> ! {
    let _ = std::thread::Builder::new()
        .name("exit-watchdog".into())
        .spawn(|| {
            std::thread::sleep(EXIT_GRACE);
            // Nothing written first: whatever holds the exit up may hold
            // the output's lock too.
            std::process::abort();
        });
    std::process::exit(code)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "pec-operator".into());
    format!("{host}-{}", std::process::id())
}
