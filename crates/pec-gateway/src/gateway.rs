//! The gateway's state and what happens to a message once the SMTP
//! dialogue has it: the access point's [`Gateway::submit`], the incoming
//! point's [`Gateway::receive`], and the jobs that deliver, emit receipts and
//! relay ([`Gateway::process`]).
//!
//! The order of every step is the durability contract: a message is in the
//! queue and its acceptance in the legal log before the client hears 250;
//! a job is dropped only after everything it emitted is on disk or handed
//! over; and what it emitted is keyed by Message-ID, so a job replayed after
//! a crash delivers and sends nothing twice.

use std::{
    collections::BTreeMap,
    ops::Range,
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use chrono::{DateTime, Duration, Utc};
use pec_core::{config::GatewayConfig, smime::TrustedSigners};
use tokio::sync::mpsc;

use crate::{
    antivirus::{Clamd, ScanError, Verdict},
    clock,
    credentials::{AuthLimiter, Credentials},
    failpoint,
    legal_log::{Entry, LegalLog},
    metrics::Metrics,
    pec::{
        checks::{self, Limits, Refusal, SmtpEnvelope},
        classify::{self, Incoming, Summary},
        compose::{self, Composed, Issuer, Notice, Transmission},
        daticert::{Daticert, Destinatario, Tipo, TipoDestinatario, TipoRicevuta},
    },
    queue::{Deadline, Job, Queue, Tracked, Work},
    relay::{Relay, RelayError},
    signer::Signer,
    smtp::Reply,
    store::{Maildirs, write_durably},
};

/// Everything a gateway process holds.
pub struct Gateway {
    /// The configuration it started with.
    pub config: GatewayConfig,
    /// Signs in the HSM.
    pub signer: Signer,
    /// The antivirus.
    pub clamd: Clamd,
    /// Mailbox passwords and which mailboxes exist.
    pub credentials: Credentials,
    /// AUTH failures per client address.
    pub auth_limiter: AuthLimiter,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    mailboxes: Maildirs,
    quarantine: PathBuf,
    log: LegalLog,
    queue: Queue,
    relay: Relay,
    trusted: RwLock<TrustedSigners>,
    gestore: String,
    clamd_ok: AtomicBool,
    jobs: mpsc::UnboundedSender<String>,
    /// Jobs waiting for a worker or running.
    scheduled: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The jobs' memory budget, in KiB of job files (see [`JOB_MEMORY_KIB`]).
    job_memory: tokio::sync::Semaphore,
    /// Signing, signature checks and the antivirus switched off (the
    /// benchmark's floor only; see [`unsecured_requested`]).
    unsecured: bool,
}

/// The most KiB of job files (messages, mostly) the running jobs hold at
/// once: 64 MiB. A job waits for its file's size of it before it starts,
/// so many workers (64 by default) run many small jobs at once, but only a
/// few large ones, and a job larger than the budget runs alone; a job
/// holds a few copies of its message while it builds envelopes and
/// receipts, which keeps it well within the gateway pod's memory limit.
pub const JOB_MEMORY_KIB: u32 = 64 * 1024;

/// The environment variable that switches signing, signature checks and the
/// antivirus off, in a build with the `bench-floor` feature.
#[cfg(feature = "bench-floor")]
pub const UNSECURED_ENV: &str = "PEC_GATEWAY_BENCH_UNSECURED";

/// Whether this process runs as the end-to-end benchmark's floor: the same
/// gateway with signing, signature checks and the antivirus switched off,
/// so the benchmark can measure what they cost. Only a build with the
/// `bench-floor` feature (tests and benchmarks) reads the environment
/// variable `PEC_GATEWAY_BENCH_UNSECURED`; in any other build, an image's
/// included, this is always false and the variable is not read.
pub fn unsecured_requested() -> bool {
    #[cfg(feature = "bench-floor")]
    {
        std::env::var_os(UNSECURED_ENV).is_some_and(|v| v == "1")
    }
    #[cfg(not(feature = "bench-floor"))]
    {
        false
    }
}

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A directory or file the configuration names is unusable.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A configuration value is wrong.
    #[error("{0}")]
    Config(String),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StartError + use<> {
    let path = path.display().to_string();
    move |source| StartError::Io { what, path, source }
}

impl Gateway {
    /// Builds the gateway from its configuration; returns the receiving end
    /// of the job channel for [`Gateway::run_jobs`].
    pub fn start(
        config: GatewayConfig,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<String>), StartError> {
        let paths = &config.paths;
        // No file: a domain with no mailboxes yet (every delivery gets a
        // non-delivery notice). A file that is there but wrong stops the start.
        let credentials = if paths.credentials.exists() {
            Credentials::load(&paths.credentials)
                .map_err(|e| StartError::Config(format!("mailbox credentials: {e}")))?
        } else {
            tracing::warn!(
                path = %paths.credentials.display(),
                "no mailbox credentials file: this domain has no mailboxes"
            );
            Credentials::parse("").map_err(StartError::Config)?
        };
        let queue = Queue::open(&paths.queue).map_err(io_err("queue", &paths.queue))?;
        let log = LegalLog::open(&paths.log).map_err(io_err("legal log", &paths.log))?;
        std::fs::create_dir_all(&paths.mailboxes).map_err(io_err("mailboxes", &paths.mailboxes))?;
        std::fs::create_dir_all(&paths.quarantine)
            .map_err(io_err("quarantine", &paths.quarantine))?;
        let clamd = Clamd::parse(&config.antivirus.clamd).map_err(StartError::Config)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let limits = &config.smtp;
        let gateway = Arc::new(Self {
            signer: Signer::new(&config),
            clamd,
            credentials,
            auth_limiter: AuthLimiter::new(
                limits.auth_failures_allowed,
                std::time::Duration::from_secs(limits.auth_lockout_seconds),
            ),
            metrics: Arc::new(Metrics::new()),
            mailboxes: Maildirs::new(&paths.mailboxes),
            quarantine: paths.quarantine.clone(),
            log,
            queue,
            relay: Relay::new(config.relay.clone(), &config.domain),
            trusted: RwLock::new(TrustedSigners::default()),
            gestore: format!("Gestore PEC di {}", config.domain),
            clamd_ok: AtomicBool::new(true),
            jobs: tx,
            scheduled: std::sync::Mutex::new(Default::default()),
            job_memory: tokio::sync::Semaphore::new(JOB_MEMORY_KIB as usize),
            unsecured: unsecured_requested(),
            config,
        });
        #[cfg(feature = "bench-floor")]
        if gateway.unsecured {
            tracing::warn!(
                "{UNSECURED_ENV}=1: nothing is signed, no signature is checked and nothing is scanned (benchmark floor)"
            );
        }
        gateway.reload_trusted();
        Ok((gateway, rx))
    }

    /// The messages in a mailbox of this domain, oldest first.
    pub fn mailbox_messages(&self, mailbox: &str) -> std::io::Result<Vec<PathBuf>> {
        blocking(|| self.mailboxes.messages(mailbox))
    }

    /// Removes the message `name` from a mailbox of this domain; `false`
    /// when there is no such message.
    pub fn remove_message(&self, mailbox: &str, name: &str) -> std::io::Result<bool> {
        blocking(|| self.mailboxes.remove(mailbox, name))
    }

    fn issuer(&self) -> Issuer<'_> {
        Issuer {
            domain: &self.config.domain,
            gestore: &self.gestore,
        }
    }

    /// Re-reads the providers' index: every PEM certificate in the
    /// configured provider files and directories, and the certificates this
    /// domain's own key published. Returns how many are trusted.
    pub fn reload_trusted(&self) -> usize {
        let mut trusted = TrustedSigners::default();
        let mut sources: Vec<PathBuf> = self.config.paths.providers.clone();
        sources.push(self.config.paths.certificates.clone());
        for source in sources {
            for file in pem_files(&source) {
                if let Ok(text) = std::fs::read_to_string(&file) {
                    trusted.add_pem(&text);
                }
            }
        }
        let n = trusted.len();
        *self.trusted.write().unwrap_or_else(|e| e.into_inner()) = trusted;
        n
    }

    /// Whether the gateway can take mail: HSM session with the named key,
    /// clamd answering, the store writable.
    pub async fn readiness(&self) -> Result<(), String> {
        self.signer
            .ensure()
            .map_err(|e| format!("signing key: {e}"))?;
        match self.clamd.ping().await {
            Ok(()) => self.clamd_ok.store(true, Ordering::Relaxed),
            Err(e) => {
                self.clamd_ok.store(false, Ordering::Relaxed);
                return Err(format!("antivirus: {e}"));
            }
        }
        let probe = self.config.paths.mailboxes.join(".ready-probe");
        std::fs::write(&probe, b"ok")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| format!("mailbox store not writable: {e}"))?;
        Ok(())
    }

    fn log(
        &self,
        identificativo: &str,
        message_id: &str,
        kind: &str,
        sender: &str,
        recipients: &[String],
        outcome: &str,
    ) {
        let entry = Entry {
            time: clock::now(),
            identificativo: identificativo.to_string(),
            message_id: message_id.to_string(),
            kind: kind.to_string(),
            sender: sender.to_string(),
            recipients: recipients.to_vec(),
            outcome: outcome.to_string(),
        };
        self.metrics
            .messages
            .with_label_values(&[kind, outcome])
            .inc();
        if let Err(e) = blocking(|| self.log.append(&entry)) {
            // The legal log is evidence: losing a line is an alarm.
            tracing::error!(error = %e, identificativo, kind, "writing the legal log failed");
        }
    }

    /// Scans `message` except the bytes in `known` (an original this
    /// gateway scanned at submission, which a receipt carries back).
    async fn scan_except(
        &self,
        message: &[u8],
        known: Option<Range<usize>>,
    ) -> Result<Verdict, Reply> {
        if self.unsecured {
            return Ok(Verdict::Clean);
        }
        let known = known.unwrap_or_default();
        let pieces = [&message[..known.start], &message[known.end..]];
        match self.clamd.scan_pieces(&pieces).await {
            Ok(v) => {
                self.clamd_ok.store(true, Ordering::Relaxed);
                self.metrics
                    .antivirus_known_bytes
                    .inc_by(known.len() as u64);
                let label = if v == Verdict::Clean {
                    "clean"
                } else {
                    "infected"
                };
                self.metrics
                    .antivirus_verdicts
                    .with_label_values(&[label])
                    .inc();
                Ok(v)
            }
            Err(e) => {
                if matches!(e, ScanError::Unreachable(_)) {
                    self.clamd_ok.store(false, Ordering::Relaxed);
                }
                self.metrics
                    .antivirus_verdicts
                    .with_label_values(&["error"])
                    .inc();
                tracing::warn!(error = %e, "antivirus scan failed; refusing temporarily");
                Err(Reply::new(
                    451,
                    "4.7.1",
                    "antivirus unavailable, message not accepted; try again later",
                ))
            }
        }
    }

    /// Keeps an infected message (never delivered) and logs the finding.
    fn quarantine(
        &self,
        id: &str,
        message_id: &str,
        sender: &str,
        recipients: &[String],
        message: &[u8],
    ) {
        let name = format!("{}.eml", safe_file_name(id));
        if let Err(e) = blocking(|| write_durably(&self.quarantine, &name, message)) {
            tracing::error!(error = %e, "quarantining an infected message failed");
        }
        self.log(
            id,
            message_id,
            "rilevazione-virus",
            sender,
            recipients,
            "virus",
        );
    }

    async fn sign(&self, composed: &Composed) -> Result<Vec<u8>, String> {
        #[cfg(feature = "bench-floor")]
        if self.unsecured {
            return Ok(crate::signer::frame_unsigned(composed));
        }
        let started = Instant::now();
        let result =
            blocking(|| self.signer.sign(composed, clock::system_now())).map_err(|e| e.to_string());
        self.metrics
            .signing_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Delivers `message` into a local mailbox once per Message-ID: the
    /// file name is derived from it, and a record of the delivery keeps a
    /// replayed job from delivering again after the reader moved the file.
    fn deliver_local(&self, address: &str, message_id: &str, message: &[u8]) -> Result<(), String> {
        let mailbox = checks::local_part(address);
        let record = format!("delivered:{mailbox}:{message_id}");
        if self.queue.was_emitted(&record) {
            return Ok(());
        }
        blocking(|| self.mailboxes.deliver_keyed(&mailbox, message_id, message))
            .map_err(|e| format!("delivering into {mailbox}: {e}"))?;
        blocking(|| self.queue.mark_emitted(&record)).map_err(|e| e.to_string())
    }

    /// Emits a signed receipt or notice to `to`: into the mailbox when `to`
    /// is in this domain, else queued for its provider. Once per Message-ID.
    async fn emit(&self, composed: Composed, kind: Tipo, t: &Transmission) -> Result<(), String> {
        let to = composed.to.first().cloned().unwrap_or_default();
        if self.queue.was_emitted(&composed.message_id) {
            return Ok(());
        }
        let signed = self.sign(&composed).await?;
        let domain = checks::domain_of(&to);
        if domain == self.config.domain {
            self.deliver_local(&to, &composed.message_id, &signed)?;
        } else {
            let job = Job::new(
                format!("emit:{}", composed.message_id),
                Work::Send {
                    from: self.issuer().system_address(),
                    to: vec![to.clone()],
                    domain,
                    envelope_of: None,
                },
                clock::now(),
            );
            blocking(|| self.queue.put(&job, &signed)).map_err(|e| e.to_string())?;
            self.wake(&job.id);
        }
        blocking(|| self.queue.mark_emitted(&composed.message_id)).map_err(|e| e.to_string())?;
        self.log(
            &t.identificativo,
            &composed.message_id,
            kind.as_str(),
            &self.issuer().system_address(),
            &[to],
            "emitted",
        );
        Ok(())
    }

    fn wake(&self, job: &str) {
        let _ = self.jobs.send(job.to_string());
    }

    /// The access point: a mailbox owner's message after DATA.
    pub async fn submit(&self, envelope: SmtpEnvelope, message: Vec<u8>) -> Reply {
        if let Some(reply) = self.cannot_certify() {
            return reply;
        }
        let limits = Limits {
            max_message_bytes: self.config.max_message_bytes.max(0) as u64,
            max_recipients: self.config.max_recipients,
        };
        let now = clock::now();
        let identificativo = compose::new_identificativo(&self.config.domain, now, rand::random());
        let submission = match checks::check_submission(&envelope, &message, limits) {
            Ok(s) => s,
            Err(refusal) => return self.refuse_submission(&envelope, &message, &refusal).await,
        };
        let t = Transmission {
            identificativo: identificativo.clone(),
            msgid: submission.message_id.clone(),
            mittente: submission.sender.clone(),
            destinatari: certified(&[submission.to.clone(), submission.cc.clone()].concat()),
            oggetto: submission.subject.clone(),
            tipo_ricevuta: submission.tipo_ricevuta,
        };
        match self.scan_except(&message, None).await {
            Err(reply) => return reply,
            Ok(Verdict::Infected(name)) => {
                self.quarantine(
                    &identificativo,
                    &t.msgid,
                    &t.mittente,
                    &envelope.forward_paths,
                    &message,
                );
                let notice = compose::receipt(
                    &t,
                    Notice::Virus(&name),
                    &t.mittente,
                    self.issuer(),
                    now,
                    None,
                );
                if let Err(e) = self.emit(notice, Tipo::NonAccettazione, &t).await {
                    tracing::warn!(error = %e, "the virus notice could not be delivered");
                }
                return Reply::new(
                    554,
                    "5.7.1",
                    format!(
                        "not accepted: virus found ({name}); the message is kept in quarantine"
                    ),
                );
            }
            Ok(Verdict::Clean) => {}
        }
        let job = Job::new(
            identificativo.clone(),
            Work::Submitted {
                identificativo: identificativo.clone(),
                sender: submission.sender.clone(),
                recipients: envelope
                    .forward_paths
                    .iter()
                    .map(|r| r.to_ascii_lowercase())
                    .collect(),
                to: submission.to,
                cc: submission.cc,
                subject: submission.subject,
                message_id: submission.message_id,
                tipo_ricevuta: submission.tipo_ricevuta.as_str().to_string(),
            },
            now,
        );
        if let Err(reply) = self.spool(&job, &message) {
            return reply;
        }
        self.log(
            &identificativo,
            &t.msgid,
            Tipo::Accettazione.as_str(),
            &t.mittente,
            &envelope.forward_paths,
            "accepted",
        );
        failpoint::hit("accepted");
        self.wake(&job.id);
        Reply::new(250, "2.0.0", format!("accepted as {identificativo}"))
    }

    /// Puts a message the gateway is about to say 250 for into the queue;
    /// the temporary refusal to give instead if the disk would not take it.
    fn spool(&self, job: &Job, message: &[u8]) -> Result<(), Reply> {
        blocking(|| self.queue.put(job, message)).map_err(|e| {
            tracing::error!(error = %e, job = job.id, "spooling a message failed");
            Reply::new(451, "4.3.0", "could not store the message; try again later")
        })
    }

    /// A temporary refusal while the gateway cannot sign: what it cannot
    /// certify it does not accept, and the sender tries again later.
    fn cannot_certify(&self) -> Option<Reply> {
        self.signer.ensure().err().map(|e| {
            tracing::warn!(
                reason = e.reason(),
                "refusing mail temporarily: cannot sign"
            );
            Reply::new(
                451,
                "4.7.0",
                format!(
                    "cannot certify messages now ({}); try again later",
                    e.reason()
                ),
            )
        })
    }

    /// Refuses a submission: a signed non-acceptance notice into the
    /// sender's mailbox, a legal log line, and the SMTP reply.
    pub async fn refuse_submission(
        &self,
        envelope: &SmtpEnvelope,
        message: &[u8],
        refusal: &Refusal,
    ) -> Reply {
        let now = clock::now();
        let identificativo = compose::new_identificativo(&self.config.domain, now, rand::random());
        let summary = classify::summary(message);
        let t = Transmission {
            identificativo: identificativo.clone(),
            msgid: summary.message_id,
            mittente: envelope.reverse_path.clone(),
            destinatari: certified(&envelope.forward_paths),
            oggetto: summary.subject,
            tipo_ricevuta: TipoRicevuta::default(),
        };
        self.log(
            &identificativo,
            &t.msgid,
            Tipo::NonAccettazione.as_str(),
            &envelope.reverse_path,
            &envelope.forward_paths,
            refusal.reason,
        );
        let notice = compose::receipt(
            &t,
            Notice::NotAccepted(&refusal.detail),
            &envelope.reverse_path,
            self.issuer(),
            now,
            None,
        );
        if let Err(e) = self.emit(notice, Tipo::NonAccettazione, &t).await {
            tracing::warn!(error = %e, "the non-acceptance notice could not be delivered");
        }
        let (code, enhanced) = if refusal.reason == "TooLarge" {
            (552, "5.3.4")
        } else {
            (550, "5.7.1")
        };
        Reply::new(code, enhanced, format!("not accepted: {}", refusal.detail))
    }

    /// The incoming point: a message from another provider after DATA.
    pub async fn receive(&self, peer: &str, envelope: SmtpEnvelope, message: Vec<u8>) -> Reply {
        if let Some(reply) = self.cannot_certify() {
            return reply;
        }
        let now = clock::now();
        let summary = classify::summary(&message);
        let id = format!(
            "in:{}:{}",
            now.timestamp_nanos_opt().unwrap_or_default(),
            rand::random::<u64>()
        );
        // A receipt for a transmission sent here is recognised first: if it
        // carries back the original this gateway scanned at submission,
        // clamd need not read that part again.
        let receipt = self.own_receipt(&summary, &message);
        let known = receipt.as_ref().and_then(|r| r.known_original.clone());
        match self.scan_except(&message, known).await {
            Err(reply) => return reply,
            Ok(Verdict::Infected(name)) => {
                return self
                    .refuse_infected(&id, &summary, &envelope, &message, &name)
                    .await;
            }
            Ok(Verdict::Clean) => {}
        }
        if let Some(receipt) = receipt {
            return match self
                .record_receipt(&id, &summary, &envelope, &message, receipt)
                .await
            {
                Ok(()) => {
                    failpoint::hit("received");
                    Reply::new(250, "2.0.0", "recorded")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "recording a receipt failed; refusing temporarily");
                    Reply::new(
                        451,
                        "4.3.0",
                        "could not record the receipt; try again later",
                    )
                }
            };
        }
        // Anything else, a claimed receipt that is not a valid one for a
        // message sent here included, is queued; its job delivers it (as an
        // anomaly where it is not valid PEC).
        let job = Job::new(
            id.clone(),
            Work::Received {
                peer: peer.to_string(),
                reverse_path: envelope.reverse_path.clone(),
                recipients: envelope.forward_paths.clone(),
            },
            now,
        );
        if let Err(reply) = self.spool(&job, &message) {
            return reply;
        }
        self.log(
            &id,
            &summary.message_id,
            "ricezione",
            &envelope.reverse_path,
            &envelope.forward_paths,
            "received",
        );
        failpoint::hit("received");
        self.wake(&job.id);
        Reply::new(250, "2.0.0", "taken")
    }

    /// Runs jobs as they come, and every few seconds the ones whose retry is
    /// due and the receipt deadlines. Returns when the channel closes.
    pub async fn run_jobs(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<String>,
        workers: usize,
    ) {
        let (work_tx, work_rx) = async_channel();
        let mut handles = Vec::new();
        for _ in 0..workers.max(1) {
            let gw = self.clone();
            let rx = work_rx.clone();
            handles.push(tokio::spawn(async move {
                loop {
                    let next = rx.lock().await.recv().await;
                    let Some(id) = next else { break };
                    gw.run_one(&id).await;
                }
            }));
        }
        drop(work_rx);
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            tokio::select! {
                id = rx.recv() => match id {
                    Some(id) => self.schedule(id, &work_tx),
                    None => break,
                },
                _ = tick.tick() => {
                    self.metrics.queue_depth.set(self.queue.depth() as i64);
                    self.reload_trusted();
                    self.relay.reload_routes();
                    match self.queue.pending() {
                        Ok((jobs, broken)) => {
                            for path in broken {
                                tracing::error!(path = %path.display(), "a queue record does not parse; set aside");
                            }
                            let now = clock::now();
                            for job in jobs.into_iter().filter(|j| j.next_attempt <= now) {
                                self.schedule(job.id, &work_tx);
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "reading the queue failed"),
                    }
                    self.check_deadlines().await;
                }
            }
        }
        drop(work_tx);
        for h in handles {
            let _ = h.await;
        }
    }

    /// Hands `id` to the workers unless it is already waiting for one or
    /// running: a job is in `scheduled` from here until its run ends.
    fn schedule(&self, id: String, work: &mpsc::UnboundedSender<String>) {
        let mut scheduled = self.scheduled.lock().unwrap_or_else(|e| e.into_inner());
        if scheduled.insert(id.clone()) {
            let _ = work.send(id);
        }
    }

    async fn run_one(&self, id: &str) {
        let memory = self.job_memory_for(id).await;
        let result = self.process(id).await;
        drop(memory);
        self.scheduled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if let Err(e) = result {
            tracing::warn!(job = id, error = %e, "job failed; it stays queued");
        }
    }

    /// Waits until job `id`'s file fits in the jobs' memory budget and
    /// holds that much of it (all of it for a file larger than the budget).
    async fn job_memory_for(&self, id: &str) -> Option<tokio::sync::SemaphorePermit<'_>> {
        // A job already done (no file) takes the least.
        let bytes = blocking(|| self.queue.size(id)).unwrap_or(0);
        // The semaphore is never closed.
        self.job_memory.acquire_many(job_kib(bytes)).await.ok()
    }

    /// Runs one job to completion, or reschedules it.
    pub async fn process(&self, id: &str) -> Result<(), String> {
        let Some(mut job) = blocking(|| self.queue.get(id)).map_err(|e| e.to_string())? else {
            return Ok(()); // Done already.
        };
        let now = clock::now();
        if job.next_attempt > now {
            return Ok(());
        }
        let data = blocking(|| self.queue.data(&job.id)).map_err(|e| format!("job data: {e}"))?;
        match job.work.clone() {
            Work::Submitted {
                identificativo,
                sender,
                recipients,
                to,
                cc,
                subject,
                message_id,
                tipo_ricevuta,
            } => {
                let t = Transmission {
                    identificativo,
                    msgid: message_id,
                    mittente: sender,
                    destinatari: certified(&[to, cc].concat()),
                    oggetto: subject,
                    tipo_ricevuta: tipo_ricevuta.parse().unwrap_or_default(),
                };
                self.dispatch_submission(&t, &recipients, &data).await?;
            }
            Work::Received {
                peer,
                reverse_path,
                recipients,
            } => {
                self.deliver_received(&peer, &reverse_path, &recipients, &data)
                    .await?;
            }
            Work::Send {
                from,
                to,
                domain,
                envelope_of,
            } => {
                failpoint::hit("before-relay");
                match self.relay.send(&domain, &from, &to, &data).await {
                    Ok(()) => {
                        self.log(
                            envelope_of.as_deref().unwrap_or(&job.id),
                            "",
                            "inoltro",
                            &from,
                            &to,
                            "relayed",
                        );
                    }
                    Err(RelayError::Temporary(e)) => {
                        job.retry_later(e.clone(), now);
                        blocking(|| self.queue.update(&job)).map_err(|e| e.to_string())?;
                        return Err(format!(
                            "relay to {domain}: {e}; retry at {}",
                            job.next_attempt
                        ));
                    }
                    Err(e @ (RelayError::Permanent(_) | RelayError::NoRoute(_))) => {
                        self.log(
                            envelope_of.as_deref().unwrap_or(&job.id),
                            "",
                            "inoltro",
                            &from,
                            &to,
                            "failed",
                        );
                        if let Some(ident) = envelope_of {
                            self.settle_as_failed(&ident, &to, &e.to_string()).await?;
                        }
                    }
                }
            }
        }
        blocking(|| self.queue.done(&job.id)).map_err(|e| e.to_string())
    }

    async fn dispatch_submission(
        &self,
        t: &Transmission,
        recipients: &[String],
        original: &[u8],
    ) -> Result<(), String> {
        let now = clock::now();
        let acceptance =
            compose::receipt(t, Notice::Accepted, &t.mittente, self.issuer(), now, None);
        self.emit(acceptance, Tipo::Accettazione, t).await?;
        let mut by_domain: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in recipients {
            by_domain
                .entry(checks::domain_of(r))
                .or_default()
                .push(r.clone());
        }
        let remote: Vec<String> = by_domain
            .iter()
            .filter(|(d, _)| **d != self.config.domain)
            .flat_map(|(_, r)| r.clone())
            .collect();
        if !remote.is_empty() && !self.queue.is_tracked(&t.identificativo) {
            let tracked = Tracked {
                identificativo: t.identificativo.clone(),
                sender: t.mittente.clone(),
                message_id: t.msgid.clone(),
                subject: t.oggetto.clone(),
                recipients: remote,
                all_recipients: recipients.to_vec(),
                sent_at: now,
                taken: Default::default(),
                settled: Default::default(),
                warned: false,
                // Only a complete delivery receipt carries it back, and
                // only a scan can skip it.
                original_sha256: (t.tipo_ricevuta == TipoRicevuta::Completa && !self.unsecured)
                    .then(|| compose::hex_digest(original)),
            };
            blocking(|| self.queue.track(&tracked)).map_err(|e| e.to_string())?;
        }
        for (domain, rcpts) in by_domain {
            let job_id = format!("{}>{domain}", t.identificativo);
            if self.queue.was_emitted(&job_id) {
                continue;
            }
            let envelope = compose::transport_envelope(t, original, &rcpts, self.issuer(), now);
            let signed = self.sign(&envelope).await?;
            let work = if domain == self.config.domain {
                Work::Received {
                    peer: "local".into(),
                    reverse_path: self.issuer().system_address(),
                    recipients: rcpts.clone(),
                }
            } else {
                Work::Send {
                    from: self.issuer().system_address(),
                    to: rcpts.clone(),
                    domain: domain.clone(),
                    envelope_of: Some(t.identificativo.clone()),
                }
            };
            let job = Job::new(job_id.clone(), work, now);
            blocking(|| self.queue.put(&job, &signed)).map_err(|e| e.to_string())?;
            blocking(|| self.queue.mark_emitted(&job_id)).map_err(|e| e.to_string())?;
            self.log(
                &t.identificativo,
                &t.msgid,
                Tipo::PostaCertificata.as_str(),
                &t.mittente,
                &rcpts,
                "queued",
            );
            self.wake(&job.id);
        }
        Ok(())
    }

    /// What `message` is, its signature checked against the providers'
    /// index (unless [`Self::unsecured`]). The index is read in place: a
    /// reload waits for the check, which never awaits.
    fn classify(&self, message: &[u8]) -> Incoming {
        #[cfg(feature = "bench-floor")]
        if self.unsecured {
            return classify::classify_unverified(message);
        }
        let trusted = self.trusted.read().unwrap_or_else(|e| e.into_inner());
        classify::classify(message, &trusted)
    }

    async fn deliver_received(
        &self,
        peer: &str,
        reverse_path: &str,
        recipients: &[String],
        message: &[u8],
    ) -> Result<(), String> {
        let now = clock::now();
        let incoming = self.classify(message);
        let ours = self.ours(recipients);
        match incoming {
            Incoming::Envelope { daticert, .. } => {
                let t = Transmission::from_daticert(&daticert);
                let from_elsewhere = checks::domain_of(&t.mittente) != self.config.domain;
                if from_elsewhere {
                    let taken = compose::receipt(
                        &t,
                        Notice::TakenInCharge,
                        &t.mittente,
                        self.issuer(),
                        now,
                        None,
                    );
                    self.emit(taken, Tipo::PresaInCarico, &t).await?;
                }
                let original = classify::original(message).unwrap_or_default();
                for rcpt in &ours {
                    let (outcome, notice, kind) =
                        if self.credentials.mailbox_exists(&checks::local_part(rcpt)) {
                            self.deliver_local(rcpt, &t.identificativo, message)?;
                            ("delivered", Notice::Delivered(rcpt), Tipo::AvvenutaConsegna)
                        } else {
                            let reason = "casella inesistente";
                            (
                                "no-mailbox",
                                Notice::NotDelivered(rcpt, reason),
                                Tipo::ErroreConsegna,
                            )
                        };
                    let to = std::slice::from_ref(rcpt);
                    self.log(
                        &t.identificativo,
                        &t.msgid,
                        "consegna",
                        &t.mittente,
                        to,
                        outcome,
                    );
                    // Only a complete delivery receipt carries the original.
                    let receipt = compose::receipt(
                        &t,
                        notice,
                        &t.mittente,
                        self.issuer(),
                        now,
                        Some(&original),
                    );
                    self.emit(receipt, kind, &t).await?;
                }
            }
            Incoming::Receipt { daticert, .. } => {
                let summary = classify::summary(message);
                let Some(sent) = self.sent_here(&daticert, &summary) else {
                    return self
                        .deliver_anomaly(
                            message,
                            reverse_path,
                            &ours,
                            "receipt for a message this provider never sent",
                        )
                        .await;
                };
                self.settle_receipt(&sent, &daticert, &summary, message, reverse_path, &ours)
                    .await?;
            }
            Incoming::Anomaly { reason, code } => {
                tracing::info!(
                    peer,
                    code,
                    "not a valid PEC message; wrapping it in an anomaly envelope"
                );
                return self
                    .deliver_anomaly(message, reverse_path, &ours, &format!("{code}: {reason}"))
                    .await;
            }
        }
        Ok(())
    }

    /// The incoming point's answer to an infected message, which is kept in
    /// quarantine and never delivered. A valid transport envelope from
    /// another provider is taken (250) and that provider gets a signed
    /// virus detection notice, from which it tells its sender; anything
    /// else is refused (554).
    async fn refuse_infected(
        &self,
        id: &str,
        summary: &Summary,
        envelope: &SmtpEnvelope,
        message: &[u8],
        name: &str,
    ) -> Reply {
        let from_elsewhere = match self.classify(message) {
            Incoming::Envelope { daticert, .. } => Some(Transmission::from_daticert(&daticert)),
            _ => None,
        }
        .filter(|t| checks::domain_of(&t.mittente) != self.config.domain);
        let Some(t) = from_elsewhere else {
            self.quarantine(
                id,
                &summary.message_id,
                &envelope.reverse_path,
                &envelope.forward_paths,
                message,
            );
            return Reply::new(
                554,
                "5.7.1",
                format!("virus found ({name}); the message is kept in quarantine"),
            );
        };
        // Notified first: a provider that hears no 250 sends the envelope
        // again, and the notice goes once per transmission.
        let notice = compose::receipt(
            &t,
            Notice::VirusDetected(name),
            &t.mittente,
            self.issuer(),
            clock::now(),
            None,
        );
        if let Err(e) = self.emit(notice, Tipo::RilevazioneVirus, &t).await {
            tracing::warn!(error = %e, "the virus detection notice could not be queued; refusing temporarily");
            return Reply::new(
                451,
                "4.3.0",
                "could not notify the sender's provider; try again later",
            );
        }
        self.quarantine(
            &t.identificativo,
            &t.msgid,
            &envelope.reverse_path,
            &envelope.forward_paths,
            message,
        );
        Reply::new(
            250,
            "2.0.0",
            format!(
                "virus found ({name}): not delivered, kept in quarantine; the sender's provider is notified"
            ),
        )
    }

    /// A message that claims to be a receipt and is a valid one for a
    /// transmission sent here (to the provider that issued it), with where
    /// it carries back the original as this gateway scanned it.
    fn own_receipt(&self, summary: &Summary, message: &[u8]) -> Option<OwnReceipt> {
        if !classify::claims_receipt(message) {
            return None;
        }
        let Incoming::Receipt {
            daticert, original, ..
        } = self.classify(message)
        else {
            return None;
        };
        let sent = self.sent_here(&daticert, summary)?;
        let known_original = original.filter(|r| {
            !self.unsecured
                && self
                    .queue
                    .scanned_original(&sent.0.identificativo)
                    .is_some_and(|scanned| scanned == compose::hex_digest(&message[r.clone()]))
        });
        Some(OwnReceipt {
            daticert,
            sent,
            known_original,
        })
    }

    /// The incoming point's short path for a receipt ([`Self::own_receipt`]):
    /// settled before the 250 rather than queued as a job. A receipt only
    /// updates the record of its transmission and goes into the sender's
    /// mailbox, both durable and keyed, so a sender that retries after a
    /// crash here changes nothing twice; and it saves a job file written,
    /// synced and removed per receipt.
    async fn record_receipt(
        &self,
        id: &str,
        summary: &Summary,
        envelope: &SmtpEnvelope,
        message: &[u8],
        receipt: OwnReceipt,
    ) -> Result<(), String> {
        let ours = self.ours(&envelope.forward_paths);
        self.log(
            id,
            &summary.message_id,
            "ricezione",
            &envelope.reverse_path,
            &envelope.forward_paths,
            "received",
        );
        self.settle_receipt(
            &receipt.sent,
            &receipt.daticert,
            summary,
            message,
            &envelope.reverse_path,
            &ours,
        )
        .await
    }

    /// The recipients among `recipients` in this domain.
    fn ours(&self, recipients: &[String]) -> Vec<String> {
        recipients
            .iter()
            .filter(|r| checks::domain_of(r) == self.config.domain)
            .cloned()
            .collect()
    }

    /// The transmission a receipt is about and the provider that issued it
    /// (from the receipt's sender address in `summary`), when this provider
    /// sent that transmission to that provider.
    fn sent_here(&self, daticert: &Daticert, summary: &Summary) -> Option<(Transmission, String)> {
        let t = Transmission::from_daticert(daticert);
        let issuer_domain = checks::domain_of(&summary.from);
        let sent = checks::domain_of(&t.mittente) == self.config.domain
            && self
                .queue
                .was_emitted(&format!("{}>{issuer_domain}", t.identificativo));
        sent.then_some((t, issuer_domain))
    }

    /// Records a receipt for a transmission sent here (`sent`, from
    /// [`Self::sent_here`]) and delivers it to the sender, except a
    /// taking-charge receipt, which passes between providers only.
    async fn settle_receipt(
        &self,
        (t, issuer_domain): &(Transmission, String),
        daticert: &Daticert,
        summary: &Summary,
        message: &[u8],
        reverse_path: &str,
        ours: &[String],
    ) -> Result<(), String> {
        let settles = matches!(daticert.tipo, Tipo::AvvenutaConsegna | Tipo::ErroreConsegna);
        let virus = daticert.tipo == Tipo::RilevazioneVirus;
        // The recipients a virus detection notice stops: every one still
        // waiting at the provider that found the virus.
        let mut stopped = Vec::new();
        let tracked = blocking(|| {
            self.queue.update_tracked(&t.identificativo, |tr| {
                tr.taken.insert(issuer_domain.clone());
                if settles && let Some(c) = &daticert.consegna {
                    tr.settled.insert(c.to_ascii_lowercase());
                }
                if virus {
                    stopped = tr
                        .unsettled()
                        .into_iter()
                        .filter(|r| checks::domain_of(r) == *issuer_domain)
                        .collect();
                    tr.settled.extend(stopped.iter().cloned());
                }
            })
        })
        .map_err(|e| e.to_string())?;
        if virus {
            // The sender hears it from this provider, as a non-delivery
            // notice per recipient; the other provider's notice is recorded.
            self.log(
                &t.identificativo,
                &t.msgid,
                Tipo::RilevazioneVirus.as_str(),
                reverse_path,
                &stopped,
                "recorded",
            );
            let name = daticert.errore_esteso.as_deref().unwrap_or("virus");
            let t = tracked.as_ref().map_or_else(|| t.clone(), transmission_of);
            for rcpt in &stopped {
                let notice = compose::receipt(
                    &t,
                    Notice::VirusNotDelivered(rcpt, name),
                    &t.mittente,
                    self.issuer(),
                    clock::now(),
                    None,
                );
                self.emit(notice, Tipo::ErroreConsegna, &t).await?;
            }
        } else if daticert.tipo == Tipo::PresaInCarico {
            // Between providers only: recorded, not delivered.
            self.log(
                &t.identificativo,
                &t.msgid,
                Tipo::PresaInCarico.as_str(),
                reverse_path,
                ours,
                "recorded",
            );
        } else {
            // To the transmission's sender only, as this gateway recorded
            // it, whatever mailboxes of this domain the SMTP envelope names.
            let sender = tracked.as_ref().map_or(&t.mittente, |tr| &tr.sender);
            self.deliver_local(sender, &summary.message_id, message)?;
            self.log(
                &t.identificativo,
                &t.msgid,
                daticert.tipo.as_str(),
                reverse_path,
                std::slice::from_ref(sender),
                "delivered",
            );
        }
        Ok(())
    }

    async fn deliver_anomaly(
        &self,
        message: &[u8],
        reverse_path: &str,
        ours: &[String],
        reason: &str,
    ) -> Result<(), String> {
        let summary = classify::summary(message);
        let sender = if summary.from.is_empty() {
            reverse_path.to_string()
        } else {
            summary.from.clone()
        };
        let existing: Vec<String> = ours
            .iter()
            .filter(|r| self.credentials.mailbox_exists(&checks::local_part(r)))
            .cloned()
            .collect();
        if existing.is_empty() {
            self.log(
                "",
                &summary.message_id,
                "anomalia",
                &sender,
                ours,
                "no-mailbox",
            );
            return Ok(());
        }
        let arrived = compose::Arrived {
            original: message,
            sender: &sender,
            subject: &summary.subject,
            message_id: &summary.message_id,
        };
        let composed =
            compose::anomaly_envelope(arrived, reason, &existing, self.issuer(), clock::now());
        let signed = self.sign(&composed).await?;
        for rcpt in &existing {
            self.deliver_local(rcpt, &composed.message_id, &signed)?;
        }
        self.log(
            "",
            &summary.message_id,
            "anomalia",
            &sender,
            &existing,
            "delivered",
        );
        Ok(())
    }

    async fn settle_as_failed(
        &self,
        identificativo: &str,
        recipients: &[String],
        reason: &str,
    ) -> Result<(), String> {
        let Some(tracked) = blocking(|| {
            self.queue.update_tracked(identificativo, |t| {
                t.settled.extend(recipients.iter().cloned());
            })
        })
        .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        let t = transmission_of(&tracked);
        for r in recipients {
            let notice = compose::receipt(
                &t,
                Notice::NotDelivered(r, reason),
                &t.mittente,
                self.issuer(),
                clock::now(),
                None,
            );
            self.emit(notice, Tipo::ErroreConsegna, &t).await?;
        }
        Ok(())
    }

    async fn check_deadlines(&self) {
        let Ok(all) = self.queue.tracked() else {
            return;
        };
        let limits = &self.config.smtp;
        let now = clock::now();
        for tracked in all {
            let deadline = tracked.deadline(
                now,
                Duration::seconds(limits.warn_after_seconds as i64),
                Duration::seconds(limits.give_up_after_seconds as i64),
            );
            let t = transmission_of(&tracked);
            let result = match deadline {
                Deadline::Wait => Ok(()),
                Deadline::Warn(rcpts) => self.notify_deadline(&t, &rcpts, false, now).await,
                Deadline::GiveUp(rcpts) => self.notify_deadline(&t, &rcpts, true, now).await,
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, identificativo = t.identificativo, "a deadline notice failed");
            }
        }
    }

    async fn notify_deadline(
        &self,
        t: &Transmission,
        rcpts: &[String],
        final_notice: bool,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        for r in rcpts {
            let (notice, kind) = if final_notice {
                (Notice::TimedOut(r), Tipo::ErroreConsegna)
            } else {
                (Notice::StillUndelivered(r), Tipo::PreavvisoErroreConsegna)
            };
            let composed = compose::receipt(t, notice, &t.mittente, self.issuer(), now, None);
            self.emit(composed, kind, t).await?;
        }
        blocking(|| {
            self.queue.update_tracked(&t.identificativo, |tr| {
                tr.warned = true;
                if final_notice {
                    tr.settled.extend(rcpts.iter().cloned());
                }
            })
        })
        .map_err(|e| e.to_string())?;
        Ok(())
    }
}

fn transmission_of(t: &Tracked) -> Transmission {
    Transmission {
        identificativo: t.identificativo.clone(),
        msgid: t.message_id.clone(),
        mittente: t.sender.clone(),
        destinatari: certified(&t.all_recipients),
        oggetto: t.subject.clone(),
        tipo_ricevuta: TipoRicevuta::default(),
    }
}

fn certified(addresses: &[String]) -> Vec<Destinatario> {
    addresses
        .iter()
        .map(|a| Destinatario {
            address: a.clone(),
            tipo: TipoDestinatario::Certificato,
        })
        .collect()
}

fn safe_file_name(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn pem_files(source: &Path) -> Vec<PathBuf> {
    if source.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(source)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_file())
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    } else if source.is_file() {
        vec![source.to_path_buf()]
    } else {
        Vec::new()
    }
}

/// A valid receipt for a transmission sent here ([`Gateway::own_receipt`]).
struct OwnReceipt {
    daticert: Daticert,
    /// The transmission and the provider that issued the receipt.
    sent: (Transmission, String),
    /// Where the receipt carries back the original byte for byte as this
    /// gateway scanned it at submission.
    known_original: Option<Range<usize>>,
}

/// What a job file of `bytes` takes of the jobs' memory budget, in KiB:
/// at least 1, at most all of it.
fn job_kib(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024))
        .unwrap_or(u32::MAX)
        .clamp(1, JOB_MEMORY_KIB)
}

/// Runs blocking work (an fsync, a token call) on this runtime thread after
/// telling the runtime, which moves the other sessions and jobs elsewhere
/// meanwhile, so a slow disk never stalls the SMTP dialogue.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

type SharedReceiver = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>>;

fn async_channel() -> (mpsc::UnboundedSender<String>, SharedReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, Arc::new(tokio::sync::Mutex::new(rx)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_takes_its_size_of_the_memory_budget_at_least_a_kib_and_at_most_all() {
        assert_eq!(job_kib(0), 1, "a job already done still takes a turn");
        assert_eq!(job_kib(1), 1);
        assert_eq!(job_kib(1024), 1);
        assert_eq!(job_kib(1025), 2);
        assert_eq!(job_kib(10 << 20), 10 * 1024);
        assert_eq!(
            job_kib(100 << 30),
            JOB_MEMORY_KIB,
            "a job larger than the budget runs alone"
        );
    }
}
