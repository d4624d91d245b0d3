//! What the gateway integration tests run against: real `pec-gateway`
//! processes, the SoftHSM2 token `e2e/test.sh` initialises (its module, label
//! and PIN come from the environment), a real clamd with a signature
//! database of the tests' own (the EICAR test string), and a test CA that
//! certifies the keys made in the token.
//!
//! Each test gets its own domains, directories and ports; the token and the
//! shared clamd are one per test binary.
#![allow(dead_code)] // each test file uses part of the harness

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use base64::Engine as _;
use pec_core::hsm::{Algorithm, Hsm, Token};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio_rustls::rustls;

/// The EICAR test string (not a virus; every antivirus flags it).
pub const EICAR: &str = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// The token the tests sign with, from `e2e/lib/hsm.sh`.
pub struct TestToken {
    pub module: PathBuf,
    pub label: String,
    pub pin: String,
    token: Mutex<Token>,
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the gateway tests through e2e/test.sh (or source e2e/lib/hsm.sh and call init_hsm DIR first)")
    })
}

static HSM: OnceLock<Hsm> = OnceLock::new();
static TOKEN: OnceLock<TestToken> = OnceLock::new();

/// The shared token.
pub fn token() -> &'static TestToken {
    TOKEN.get_or_init(|| {
        let module = PathBuf::from(var("PEC_PKCS11_MODULE"));
        let label = var("PEC_E2E_HSM_TOKEN");
        let pin = var("PEC_E2E_HSM_PIN");
        var("SOFTHSM2_CONF");
        let hsm = HSM.get_or_init(|| Hsm::open(&module).expect("load the PKCS#11 module"));
        let token = hsm
            .login(&label, &pec_core::hsm::AuthPin::from(pin.clone()))
            .expect("log in to the test token");
        TestToken {
            module,
            label,
            pin,
            token: Mutex::new(token),
        }
    })
}

impl TestToken {
    /// A fresh key pair in the token; returns its id (hex) and public key.
    pub fn new_key(&self, name: &str) -> (String, Vec<u8>) {
        let seed = format!("{name}-{}-{}", std::process::id(), unique());
        let id = pec_core::hsm::key_id(&seed, 1);
        let token = self.token.lock().unwrap_or_else(|e| e.into_inner());
        token
            .ensure_key(&id, name, Algorithm::EcdsaP256, false)
            .expect("generate a key in the token");
        let spki = token.public_key(&id).expect("read the public key");
        (pec_core::der::hex(&id), spki)
    }

    /// Signs `data` with the key `id_hex`, in the token.
    pub fn sign(&self, id_hex: &str, data: &[u8]) -> Result<Vec<u8>, pec_core::hsm::HsmError> {
        let token = self.token.lock().unwrap_or_else(|e| e.into_inner());
        let id = pec_core::der::from_hex(id_hex).expect("hex id");
        let key = token.existing_key(&id)?;
        token.sign(key, Algorithm::EcdsaP256, data)
    }
}

/// A number no other call in this process returns.
pub fn unique() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The test CA.
pub struct Pki {
    key: KeyPair,
    params: CertificateParams,
    /// The CA certificate, PEM.
    pub ca_pem: String,
}

static PKI: OnceLock<Pki> = OnceLock::new();

/// The shared test CA.
pub fn pki() -> &'static Pki {
    PKI.get_or_init(|| {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, "pec-gateway test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_pem = params.self_signed(&key).expect("CA certificate").pem();
        Pki {
            key,
            params,
            ca_pem,
        }
    })
}

impl Pki {
    /// A PEC signing certificate for the token key `spki`.
    pub fn signing_cert(&self, spki: &[u8], domain: &str) -> String {
        let public = rcgen::SubjectPublicKeyInfo::from_der(spki).expect("token public key");
        let mut params = CertificateParams::new(vec![domain.to_string()]).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("posta-certificata@{domain}"));
        params.subject_alt_names.push(SanType::Rfc822Name(
            format!("posta-certificata@{domain}")
                .try_into()
                .expect("address"),
        ));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::ContentCommitment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::EmailProtection];
        let issuer = Issuer::from_params(&self.params, &self.key);
        params
            .signed_by(&public, &issuer)
            .expect("sign the certificate")
            .pem()
    }

    /// A TLS server certificate and key for `host`.
    pub fn tls(&self, host: &str) -> (String, String) {
        let key = KeyPair::generate().expect("TLS key");
        let params = CertificateParams::new(vec![host.to_string()]).expect("params");
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("TLS certificate");
        (cert.pem(), key.serialize_pem())
    }
}

/// A free TCP port on loopback, never the same twice in this process (the
/// kernel may hand out a port again once its probe socket is closed, before
/// the gateway it was meant for has bound it).
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<std::collections::HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Mutex::default);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        if given.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
}

/// A clamd of the tests' own: a temporary directory, a TCP port, and one
/// signature (EICAR).
pub struct Clamd {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Clamd {
    /// Starts clamd and waits until it answers PING.
    pub fn start() -> Clamd {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("db");
        std::fs::create_dir_all(&db).expect("db dir");
        let md5 = md5_hex(EICAR.as_bytes());
        std::fs::write(
            db.join("test.hdb"),
            format!("{md5}:{}:Eicar-Test-Signature\n", EICAR.len()),
        )
        .expect("hdb");
        let port = free_port();
        let mut c = Clamd {
            port,
            dir,
            child: None,
        };
        c.spawn();
        c
    }

    /// Starts clamd. `PEC_TEST_CLAMD_TMPDIR` names the directory where it
    /// spools each stream it scans (its `TemporaryDirectory`; clamd's
    /// default otherwise), for the benchmark to compare file systems.
    fn spawn(&mut self) {
        let conf = self.dir.path().join("clamd.conf");
        let mut text = format!(
            "Foreground yes\nTCPSocket {}\nTCPAddr 127.0.0.1\nDatabaseDirectory {}\nLogFile {}\nLogTime yes\nStreamMaxLength 120M\n",
            self.port,
            self.dir.path().join("db").display(),
            self.dir.path().join("clamd.log").display()
        );
        if let Some(spool) = std::env::var_os("PEC_TEST_CLAMD_TMPDIR") {
            std::fs::create_dir_all(&spool).expect("clamd's temporary directory");
            text.push_str(&format!(
                "TemporaryDirectory {}\n",
                Path::new(&spool).display()
            ));
        }
        std::fs::write(&conf, text).expect("clamd.conf");
        let child = Command::new("clamd")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start clamd (Debian package clamav-daemon)");
        self.child = Some(child);
        wait_for(Duration::from_secs(60), "clamd to answer PING", || {
            self.ping()
        });
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"zPING\0").is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"PONG"))
    }

    /// The address for gateway.yaml.
    pub fn address(&self) -> String {
        format!("tcp:127.0.0.1:{}", self.port)
    }

    /// Stops clamd (the gateway must then refuse temporarily).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Clamd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A DNS server of the test's own (dnsmasq, Debian's `dnsmasq-base`) on a
/// loopback port: authoritative for `.test` (every other `.test` name is
/// NXDOMAIN), with the MX and address records given.
pub struct Dns {
    pub port: u16,
    child: Child,
}

impl Dns {
    /// Serves `mx` (`domain`, `host`, `preference`) and `hosts` (`name`, `ip`).
    pub fn start(mx: &[(&str, &str, u16)], hosts: &[(&str, &str)]) -> Dns {
        let port = free_port();
        let mut cmd = Command::new("dnsmasq");
        cmd.args(["--keep-in-foreground", "--no-resolv", "--no-hosts"])
            .args(["--bind-interfaces", "--listen-address=127.0.0.1"])
            .args(["--conf-file=/dev/null", "--pid-file=", "--local=/test/"])
            .arg(format!("--port={port}"));
        for (domain, host, preference) in mx {
            cmd.arg(format!("--mx-host={domain},{host},{preference}"));
        }
        for (name, ip) in hosts {
            cmd.arg(format!("--host-record={name},{ip}"));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq (Debian package dnsmasq-base)");
        wait_for(Duration::from_secs(10), "dnsmasq to listen", || {
            std::net::UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.connect(("127.0.0.1", port)).map(|_| s))
                .and_then(|s| {
                    s.set_read_timeout(Some(Duration::from_millis(200)))?;
                    // A query for `test.` (type SOA): any answer will do.
                    s.send(b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04test\x00\x00\x06\x00\x01")?;
                    let mut buf = [0u8; 512];
                    s.recv(&mut buf)
                })
                .is_ok()
        });
        Dns { port, child }
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

static SHARED_CLAMD: OnceLock<Mutex<Clamd>> = OnceLock::new();

/// The clamd most tests share (started once; killed when the test process
/// ends, by a watcher that outlives no one).
pub fn shared_clamd() -> String {
    let c = SHARED_CLAMD.get_or_init(|| {
        let c = Clamd::start();
        if let Some(child) = &c.child {
            // Statics are never dropped: a small watcher kills clamd once
            // this test process is gone.
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "while kill -0 {} 2>/dev/null; do sleep 0.5; done; kill {} 2>/dev/null",
                    std::process::id(),
                    child.id()
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
        }
        Mutex::new(c)
    });
    c.lock().unwrap_or_else(|e| e.into_inner()).address()
}

fn md5_hex(data: &[u8]) -> String {
    // clamd's hash databases want MD5; it is used here only to name the
    // test signature, never for anything that needs a secure hash.
    let out = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("stdin").write_all(data)?;
            c.wait_with_output()
        })
        .expect("md5sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Polls `check` every 50 ms until it holds, or panics naming `what`.
pub fn wait_for(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One PEC domain: its key, certificate, mailboxes and directories.
pub struct Domain {
    pub name: String,
    pub key_id: String,
    pub cert_pem: String,
    pub generation: i64,
    pub mailboxes: Vec<(String, String)>,
    pub smtp: u16,
    pub submissions: u16,
    pub http: u16,
    pub https: u16,
    pub dir: PathBuf,
    pub receive_only: bool,
}

impl Domain {
    /// A domain with a fresh key in the token and mailboxes `name:password`.
    pub fn new(root: &Path, name: &str, mailboxes: &[(&str, &str)]) -> Domain {
        let (key_id, spki) = token().new_key(name);
        let cert_pem = pki().signing_cert(&spki, name);
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("certificates")).expect("dirs");
        std::fs::write(dir.join("certificates/g1.crt"), &cert_pem).expect("g1.crt");
        Domain {
            name: name.to_string(),
            key_id,
            cert_pem,
            generation: 1,
            mailboxes: mailboxes
                .iter()
                .map(|(m, p)| (m.to_string(), p.to_string()))
                .collect(),
            smtp: free_port(),
            submissions: free_port(),
            http: free_port(),
            https: free_port(),
            dir,
            receive_only: false,
        }
    }

    /// Makes generation `generation` with a new key (the operator's rotation,
    /// as the gateway sees it): the certificate is published beside the old.
    pub fn rotate(&mut self, generation: i64) {
        let (key_id, spki) = token().new_key(&self.name);
        self.cert_pem = pki().signing_cert(&spki, &self.name);
        self.key_id = key_id;
        self.generation = generation;
        std::fs::write(
            self.dir.join(format!("certificates/g{generation}.crt")),
            &self.cert_pem,
        )
        .expect("cert");
    }

    /// The gateway.yaml of this domain.
    pub fn config(
        &self,
        clamd: &str,
        providers: &Path,
        routes: &[(&str, u16)],
        pin_file: &Path,
    ) -> String {
        let cert = self
            .dir
            .join(format!("certificates/g{}.crt", self.generation));
        let sha = sha256_hex(&pem_der(&std::fs::read_to_string(&cert).expect("cert")));
        let (tls_cert, tls_key) = pki().tls("localhost");
        std::fs::write(self.dir.join("tls.crt"), tls_cert).expect("tls.crt");
        std::fs::write(self.dir.join("tls.key"), tls_key).expect("tls.key");
        let creds: String = self
            .mailboxes
            .iter()
            .map(|(m, p)| {
                let hash = if p.is_empty() {
                    "!".to_string()
                } else {
                    cheap_hash(p)
                };
                format!("{m}:{hash}\n")
            })
            .collect();
        std::fs::write(self.dir.join("credentials"), creds).expect("credentials");
        let routes: String = routes
            .iter()
            .map(|(d, port)| format!("    {d}: 127.0.0.1:{port}\n"))
            .collect();
        let profile = if self.receive_only {
            "ReceiveOnly"
        } else {
            "Standard"
        };
        let protocols = if self.receive_only {
            "[smtp, https]"
        } else {
            "[smtp, submissions, imaps, pop3s, https]"
        };
        format!(
            r#"domain: {name}
profile: {profile}
site: dc-test
maxMessageBytes: 200000
maxRecipients: 5
antivirus:
  enabled: true
  infectedAction: RefuseNotifySenderQuarantine
  quarantineRetention: 30mo
  clamd: "{clamd}"
protocols: {protocols}
signingKeyRef: {name}-key
signing:
  key: {name}-key
  tokenLabel: {label}
  keyId: "{key_id}"
  generation: {generation}
  certificateSecret: {name}-key-certificates
  certificateKey: g{generation}.crt
  certificateSha256: "{sha}"
hsm:
  module: {module}
  pinFile: {pin_file}
listen:
  smtp: 127.0.0.1:{smtp}
  submissions: 127.0.0.1:{submissions}
  http: 127.0.0.1:{http}
  https: 127.0.0.1:{https}
paths:
  mailboxes: {dir}/mailboxes
  queue: {dir}/queue
  quarantine: {dir}/quarantine
  log: {dir}/log
  certificates: {dir}/certificates
  providers: [{providers}]
  credentials: {dir}/credentials
tls:
  certFile: {dir}/tls.crt
  keyFile: {dir}/tls.key
relay:
  insecureTls: true
  routes:
{routes}smtp:
  idleTimeoutSeconds: 3
  dataTimeoutSeconds: 5
  authFailuresAllowed: 3
  authLockoutSeconds: 60
  shutdownGraceSeconds: 10
  shutdownDelaySeconds: 0
  warnAfterSeconds: 43200
  giveUpAfterSeconds: 86400
"#,
            name = self.name,
            label = token().label,
            key_id = self.key_id,
            generation = self.generation,
            module = token().module.display(),
            pin_file = pin_file.display(),
            smtp = self.smtp,
            submissions = self.submissions,
            http = self.http,
            https = self.https,
            dir = self.dir.display(),
            providers = providers.display(),
        )
    }
}

fn cheap_hash(password: &str) -> String {
    // Tests log in a lot: a low-cost argon2id hash keeps them quick. The
    // gateway verifies whatever cost the PHC string names.
    use argon2::{
        Algorithm as A, Argon2, Params, PasswordHasher, Version, password_hash::SaltString,
    };
    let salt = SaltString::encode_b64(b"pec-test-salt-16").expect("salt");
    Argon2::new(
        A::Argon2id,
        Version::V0x13,
        Params::new(1024, 1, 1, None).expect("params"),
    )
    .hash_password(password.as_bytes(), &salt)
    .expect("hash")
    .to_string()
}

/// DER of the first PEM certificate.
pub fn pem_der(pem: &str) -> Vec<u8> {
    pec_core::smime::pem_certificates(pem)
        .into_iter()
        .next()
        .expect("a certificate")
}

/// SHA-256, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    pec_core::der::hex(&sha2::Sha256::digest(data))
}

/// A running `pec-gateway`.
pub struct Gateway {
    pub domain: String,
    pub dir: PathBuf,
    pub smtp: u16,
    pub submissions: u16,
    pub http: u16,
    config: PathBuf,
    child: Option<Child>,
    extra_env: Vec<(String, String)>,
}

impl Gateway {
    /// Writes `config` for `domain` and starts the gateway.
    pub fn start(domain: &Domain, config: &str, env: &[(&str, &str)]) -> Gateway {
        let path = domain.dir.join("gateway.yaml");
        std::fs::write(&path, config).expect("gateway.yaml");
        let mut g = Gateway {
            domain: domain.name.clone(),
            dir: domain.dir.clone(),
            smtp: domain.smtp,
            submissions: domain.submissions,
            http: domain.http,
            config: path,
            child: None,
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        g.spawn();
        g
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("gateway.log"))
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pec-gateway"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start pec-gateway"));
        self.wait_until(Duration::from_secs(60), "listening", |g| {
            TcpStream::connect(("127.0.0.1", g.smtp)).is_ok()
        });
    }

    /// Polls `check` until it holds; on time-out panics with the end of the
    /// gateway's own log, which says why.
    pub fn wait_until(&self, timeout: Duration, what: &str, check: impl Fn(&Gateway) -> bool) {
        let start = Instant::now();
        while !check(self) {
            if start.elapsed() > timeout {
                let log = self.output();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                panic!(
                    "timed out after {timeout:?} waiting for {} to be {what}; /readyz says {:?}; its log ends:\n{}",
                    self.domain,
                    self.http_get("/readyz").2,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `/readyz` says ready.
    pub fn wait_ready(&self) {
        self.wait_until(Duration::from_secs(60), "ready", Gateway::ready);
    }

    /// Sets an environment variable for the next start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.extra_env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.extra_env.push((key.to_string(), v.to_string()));
        }
    }

    /// Rewrites gateway.yaml (takes effect at the next restart).
    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(&self.config, config).expect("gateway.yaml");
    }

    /// SIGKILL, like a node losing power.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again after a kill.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Sends SIGTERM and returns at once (see [`Gateway::wait_exit`]).
    pub fn term(&self) {
        let child = self.child.as_ref().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
    }

    /// Sends SIGTERM and returns the exit status and how long it took.
    pub fn sigterm(&mut self) -> (std::process::ExitStatus, Duration) {
        let mut child = self.child.take().expect("running");
        let start = Instant::now();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let status = child.wait().expect("wait");
        (status, start.elapsed())
    }

    /// Whether the process is still running (false after it aborted itself).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits for the process to exit by itself (a crash point).
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return status;
            }
            assert!(start.elapsed() < timeout, "gateway did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET path` on the HTTP port: status and body.
    pub fn http_get(&self, path: &str) -> (u16, String, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.http)).expect("http connect");
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, head.to_string(), body.to_string())
    }

    /// Whether /readyz says ready.
    pub fn ready(&self) -> bool {
        self.http_get("/readyz").0 == 200
    }

    /// Every message in a mailbox.
    pub fn mailbox(&self, name: &str) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            let dir = self.dir.join("mailboxes").join(name).join(sub);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut paths: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    !p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                })
                .collect();
            paths.sort();
            out.extend(paths.iter().filter_map(|p| std::fs::read(p).ok()));
        }
        out
    }

    /// The messages of a mailbox whose headers contain `needle`.
    pub fn find(&self, mailbox: &str, needle: &str) -> Vec<Vec<u8>> {
        self.mailbox(mailbox)
            .into_iter()
            .filter(|m| header_block(m).contains(needle))
            .collect()
    }

    /// Waits until `mailbox` holds `n` messages whose headers contain `needle`.
    pub fn wait_for_mail(&self, mailbox: &str, needle: &str, n: usize) -> Vec<Vec<u8>> {
        let start = Instant::now();
        while self.find(mailbox, needle).len() < n {
            if start.elapsed() > Duration::from_secs(60) {
                let log = self.output();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                panic!(
                    "timed out waiting for {n} message(s) with {needle:?} in {mailbox}@{}; its log ends:\n{}",
                    self.domain,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.find(mailbox, needle)
    }

    /// Files in the quarantine.
    pub fn quarantined(&self) -> usize {
        std::fs::read_dir(self.dir.join("quarantine"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .count()
            })
            .unwrap_or(0)
    }

    /// The legal log file.
    pub fn legal_log(&self) -> PathBuf {
        self.dir.join("log/legal.log")
    }

    /// The gateway's own log so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The header block of a message, unfolded, as text.
pub fn header_block(message: &[u8]) -> String {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(message.len());
    String::from_utf8_lossy(&message[..end])
        .replace("\r\n ", " ")
        .replace("\r\n\t", " ")
}

/// Two Standard domains that route to each other, sharing one providers'
/// index and the shared clamd: `pec-a.test` (mailbox mario) and
/// `pec-b.test` (mailboxes anna and bruno).
pub struct Pair {
    pub root: tempfile::TempDir,
    pub a: Gateway,
    pub b: Gateway,
    pub da: Domain,
    pub db: Domain,
    pub providers: PathBuf,
    pub pin_file: PathBuf,
    pub clamd: String,
}

/// Mario's password on pec-a.test.
pub const MARIO_PASSWORD: &str = "mario-secret";

impl Pair {
    /// Starts both gateways and waits until both are ready.
    pub fn start() -> Pair {
        Self::start_with(&shared_clamd(), &[])
    }

    /// Starts both against `clamd`, with extra environment for gateway A.
    pub fn start_with(clamd: &str, env_a: &[(&str, &str)]) -> Pair {
        let root = tempfile::tempdir().expect("tempdir");
        let n = unique();
        let da = Domain::new(
            root.path(),
            &format!("pec-a{n}.test"),
            &[("mario", MARIO_PASSWORD), ("luigi", "luigi-secret")],
        );
        let db = Domain::new(
            root.path(),
            &format!("pec-b{n}.test"),
            &[("anna", "anna-secret"), ("bruno", "bruno-secret")],
        );
        let providers = root.path().join("providers");
        std::fs::create_dir_all(&providers).expect("providers");
        std::fs::write(providers.join("a.pem"), &da.cert_pem).expect("a.pem");
        std::fs::write(providers.join("b.pem"), &db.cert_pem).expect("b.pem");
        let pin_file = root.path().join("pin");
        std::fs::write(&pin_file, &token().pin).expect("pin");
        let ca = Gateway::start(
            &da,
            &da.config(clamd, &providers, &[(&db.name, db.smtp)], &pin_file),
            env_a,
        );
        let cb = Gateway::start(
            &db,
            &db.config(clamd, &providers, &[(&da.name, da.smtp)], &pin_file),
            &[],
        );
        let pair = Pair {
            a: ca,
            b: cb,
            da,
            db,
            providers,
            pin_file,
            clamd: clamd.to_string(),
            root,
        };
        wait_for(Duration::from_secs(30), "both gateways ready", || {
            pair.a.ready() && pair.b.ready()
        });
        pair
    }

    /// Mario's address.
    pub fn mario(&self) -> String {
        format!("mario@{}", self.da.name)
    }

    /// Anna's address.
    pub fn anna(&self) -> String {
        format!("anna@{}", self.db.name)
    }

    /// The test CA as a file, for openssl.
    pub fn ca_file(&self) -> PathBuf {
        let path = self.root.path().join("ca.pem");
        std::fs::write(&path, &pki().ca_pem).expect("ca.pem");
        path
    }
}

/// Verifies an S/MIME message with openssl against the test CA; returns the
/// signer certificate's PEM on success, openssl's complaint otherwise.
pub fn openssl_verify(message: &[u8], ca_file: &Path) -> Result<String, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let msg = dir.path().join("msg.eml");
    let signer = dir.path().join("signer.pem");
    std::fs::write(&msg, message).expect("write");
    let out = Command::new("openssl")
        .args(["smime", "-verify", "-in"])
        .arg(&msg)
        .arg("-CAfile")
        .arg(ca_file)
        .arg("-signer")
        .arg(&signer)
        .args(["-out", "/dev/null"])
        .output()
        .expect("openssl");
    if out.status.success() {
        Ok(std::fs::read_to_string(&signer).unwrap_or_default())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// A synchronous SMTP client that speaks exactly what a test tells it.
pub struct Client {
    reader: BufReader<Box<dyn ReadWrite>>,
    socket: TcpStream,
}

/// A stream to read and write.
pub trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

impl Client {
    /// Port 25, in clear; reads the greeting.
    pub fn plain(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut c = Client {
            socket: s.try_clone().expect("clone"),
            reader: BufReader::new(Box::new(s)),
        };
        let (code, _) = c.reply();
        assert_eq!(code, 220, "greeting");
        c
    }

    /// Port 465, implicit TLS trusting the test CA; reads the greeting.
    pub fn tls(port: u16) -> Client {
        let (socket, stream) = tls_connect(port);
        let mut c = Client {
            reader: BufReader::new(Box::new(stream)),
            socket,
        };
        let (code, _) = c.reply();
        assert_eq!(code, 220, "greeting");
        c
    }

    /// Port 465, logged in as `user` with `password`, after EHLO.
    pub fn login(port: u16, user: &str, password: &str) -> Client {
        let mut c = Client::tls(port);
        c.expect("EHLO client.test", 250);
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        c.expect(&format!("AUTH PLAIN {token}"), 235);
        c
    }

    /// Reads one (possibly multi-line) reply.
    pub fn reply(&mut self) -> (u16, String) {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap_or(0);
            if n == 0 {
                return (0, text);
            }
            text.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                return (code, text);
            }
        }
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes).expect("write");
    }

    /// Sends raw bytes; the error if the server has hung up.
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let w = self.reader.get_mut();
        w.write_all(bytes)?;
        w.flush()
    }

    /// A reply if one arrives within `wait`.
    pub fn reply_within(&mut self, wait: Duration) -> Option<(u16, String)> {
        let _ = self.socket.set_read_timeout(Some(wait));
        let got = self.reply();
        let _ = self.socket.set_read_timeout(Some(Duration::from_secs(30)));
        (got.0 != 0).then_some(got)
    }

    /// Sends a command line and reads the reply.
    pub fn cmd(&mut self, line: &str) -> (u16, String) {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Sends a command and asserts the reply code.
    pub fn expect(&mut self, line: &str, code: u16) -> String {
        let (got, text) = self.cmd(line);
        assert_eq!(got, code, "{line:?} -> {text}");
        text
    }

    /// DATA with `message` (CRLF; dot-stuffed here), returning the final reply.
    pub fn data(&mut self, message: &str) -> (u16, String) {
        let (code, text) = self.cmd("DATA");
        if code != 354 {
            return (code, text);
        }
        let mut body = String::new();
        for line in message.split("\r\n") {
            if line.starts_with('.') {
                body.push('.');
            }
            body.push_str(line);
            body.push_str("\r\n");
        }
        if body.ends_with("\r\n\r\n") {
            body.truncate(body.len() - 2);
        }
        body.push_str(".\r\n");
        self.send(body.as_bytes());
        self.reply()
    }

    /// MAIL, RCPT and DATA, then the first bytes of a message that is left
    /// unfinished: a transaction in flight.
    pub fn begin_data(&mut self, from: &str, to: &str, partial: &str) {
        self.expect(&format!("MAIL FROM:<{from}>"), 250);
        self.expect(&format!("RCPT TO:<{to}>"), 250);
        self.expect("DATA", 354);
        self.send(partial.as_bytes());
    }

    /// A whole transaction: MAIL, RCPT for each, DATA.
    pub fn send_mail(&mut self, from: &str, to: &[&str], message: &str) -> (u16, String) {
        self.expect(&format!("MAIL FROM:<{from}>"), 250);
        for t in to {
            self.expect(&format!("RCPT TO:<{t}>"), 250);
        }
        self.data(message)
    }

    /// [`Client::send_mail`] of a plain [`message`] from `from` to `to`,
    /// the envelope matching its headers.
    pub fn send_message(
        &mut self,
        from: &str,
        to: &[&str],
        subject: &str,
        body: &str,
    ) -> (u16, String) {
        self.send_mail(from, to, &message(from, to, subject, body))
    }
}

/// A TLS connection to `port` on loopback that trusts the test CA, and a
/// second handle on its socket (to change read timeouts).
fn tls_connect(
    port: u16,
) -> (
    TcpStream,
    rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
) {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pem_der(&pki().ca_pem).into()).expect("CA");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().expect("name"))
            .expect("tls");
    let socket = s.try_clone().expect("clone");
    (socket, rustls::StreamOwned::new(conn, s))
}

/// An HTTPS request to the message API on `port` (trusting the test CA),
/// with Basic credentials if given: the status and the body.
pub fn https_request(
    port: u16,
    method: &str,
    path: &str,
    auth: Option<(&str, &str)>,
) -> (u16, Vec<u8>) {
    let (_, mut stream) = tls_connect(port);
    let authorization = auth
        .map(|(u, p)| {
            format!(
                "Authorization: Basic {}\r\n",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        })
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{authorization}Connection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(response.len());
    let head = String::from_utf8_lossy(&response[..end]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response.get(end + 4..).unwrap_or_default().to_vec();
    (status, body)
}

/// A plain message from `from` to `to`.
pub fn message(from: &str, to: &[&str], subject: &str, body: &str) -> String {
    format!(
        "From: {from}\r\nTo: {}\r\nSubject: {subject}\r\nMessage-ID: <{}.{}@client.test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0100\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n",
        to.join(", "),
        std::process::id(),
        unique()
    )
}
