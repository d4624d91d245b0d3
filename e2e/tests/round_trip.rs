//! The `PecRoundTrip` availability probe against a real gateway: the
//! operator renders a Standard domain's `gateway.yaml`, the test runs
//! `pec-gateway` from it as a local process (the kwok pods run nothing),
//! signing with the SigningKey's key in the SoftHSM2 token and scanning with
//! the tests' clamd, and an SlaTarget probes it by sending real PEC mail.
//! A gateway restarted with a wrong HSM PIN keeps answering SMTP but cannot
//! sign: the probe records an outage (`NoAcceptance`) for as long as that
//! lasts, and closes it once the gateway has the right PIN again.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};
use pec_core::config::GatewayConfig;
use pec_operator::api::{MailDomain, SlaObjectStatus, SlaTarget};
use serde_json::json;

use crate::{
    datacenter::{TestSites, free_port},
    failover::fast_health,
    harness::{client, condition, eventually, example, has_condition, namespace, wait_for},
    signing::{PIN_SECRET, create_key, pin_secret, real_pin, signing_key, wait_ready},
    sla::measure,
};

const DOMAIN: &str = "probe.pec.example.it";
const MAILBOX: &str = "sla-probe";

/// A `pec-gateway serve` process run from a rendered configuration.
struct LocalGateway {
    dir: PathBuf,
    config: GatewayConfig,
    child: Option<Child>,
}

impl LocalGateway {
    /// Starts the gateway with `pin` in its PIN file and waits until its
    /// health endpoint answers (ready or not).
    fn start(&mut self, pin: &str) {
        std::fs::write(&self.config.hsm.pin_file, pin).expect("PIN file");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("gateway.log"))
            .expect("gateway log");
        let binary = std::env::var("PEC_E2E_GATEWAY").expect("e2e/test.sh sets PEC_E2E_GATEWAY");
        let child = Command::new(binary)
            .args(["serve", "--log-format", "text", "--config"])
            .arg(self.dir.join("gateway.yaml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start pec-gateway");
        self.child = Some(child);
        let started = Instant::now();
        while self.http_status("/healthz") != Some(200) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the gateway did not come up: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The status code of a GET of `path` on the health port.
    fn http_status(&self, path: &str) -> Option<u16> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.config.listen.http).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).ok()?;
        answer.split_whitespace().nth(1)?.parse().ok()
    }

    /// The probe mailbox's messages on disk (every Maildir folder).
    fn probe_messages(&self) -> usize {
        let root = self.config.paths.mailboxes.join(MAILBOX);
        ["new", "cur"]
            .iter()
            .filter_map(|d| std::fs::read_dir(root.join(d)).ok())
            .map(|entries| entries.count())
            .sum()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for LocalGateway {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes `data` (a Secret's or ConfigMap's) into `dir`, a file per key.
fn write_files<'a>(dir: &Path, data: impl IntoIterator<Item = (&'a String, Vec<u8>)>) {
    std::fs::create_dir_all(dir).expect("dir");
    for (key, value) in data {
        std::fs::write(dir.join(key), value).expect("file");
    }
}

fn secret_files(secret: &Secret) -> Vec<(&String, Vec<u8>)> {
    secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k, v.0.clone()))
        .collect()
}

/// The rendered configuration of `md` in `site`, pointed at local files and
/// loopback ports: the Secrets and ConfigMaps the pod would mount are
/// written under `dir`.
async fn local_gateway(client: &Client, ns: &str, md: &MailDomain, site: &str) -> LocalGateway {
    let dir = std::env::temp_dir().join(format!("pec-e2e-round-trip-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("gateway dir");
    let child = format!("{}-{site}", md.name_any());
    let rendered = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(&child)
        .await
        .expect("the gateway ConfigMap");
    let yaml = rendered
        .data
        .as_ref()
        .and_then(|d| d.get(pec_core::config::FILE_NAME))
        .expect("gateway.yaml");
    let mut config = GatewayConfig::from_yaml(yaml).expect("the rendered gateway.yaml parses");
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    let secret = |name: String| {
        let secrets = secrets.clone();
        async move { secrets.get(&name).await.expect("a Secret the pod mounts") }
    };
    let signing = config
        .signing
        .clone()
        .expect("a signing key in gateway.yaml");
    write_files(
        &dir.join("certificates"),
        secret_files(&secret(signing.certificate_secret.clone()).await),
    );
    let tls = secret(md.spec.gateway.tls_secret_ref.clone().expect("TLS Secret")).await;
    write_files(&dir.join("tls"), secret_files(&tls));
    let mailboxes = secret(
        md.spec
            .gateway
            .mailboxes_secret_ref
            .clone()
            .expect("mailboxes"),
    )
    .await;
    write_files(&dir.join("credentials"), secret_files(&mailboxes));

    config.hsm.module = std::env::var("PEC_PKCS11_MODULE")
        .expect("e2e/test.sh sets PEC_PKCS11_MODULE")
        .into();
    config.hsm.pin_file = dir.join("pin");
    for address in [
        &mut config.listen.smtp,
        &mut config.listen.submissions,
        &mut config.listen.http,
        &mut config.listen.https,
    ] {
        *address = format!("127.0.0.1:{}", free_port());
    }
    config.paths.mailboxes = dir.join("mailboxes");
    config.paths.queue = dir.join("queue");
    config.paths.quarantine = dir.join("quarantine");
    config.paths.log = dir.join("log");
    config.paths.certificates = dir.join("certificates");
    config.paths.providers = vec![];
    config.paths.credentials = dir.join("credentials").join("mailboxes");
    let tls_files = config.tls.as_mut().expect("TLS in gateway.yaml");
    tls_files.cert_file = dir.join("tls").join("tls.crt");
    tls_files.key_file = dir.join("tls").join("tls.key");
    std::fs::write(
        dir.join("gateway.yaml"),
        serde_yaml::to_string(&config).expect("yaml"),
    )
    .expect("gateway.yaml");
    LocalGateway {
        dir,
        config,
        child: None,
    }
}

/// A self-signed TLS certificate for `names` (the first is also the common
/// name) in a `kubernetes.io/tls` Secret.
pub async fn tls_secret(client: &Client, ns: &str, name: &str, names: &[&str]) {
    let domain = names.first().expect("at least one name");
    let alt_names: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
    let dir = std::env::temp_dir().join(format!("pec-e2e-tls-{}-{ns}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={domain}")])
        .args([
            "-addext",
            &format!("subjectAltName={}", alt_names.join(",")),
        ])
        .arg("-keyout")
        .arg(dir.join("tls.key"))
        .arg("-out")
        .arg(dir.join("tls.crt"))
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("read");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": read("tls.crt"), "tls.key": read("tls.key")},
    }))
    .expect("secret");
    let _ = std::fs::remove_dir_all(&dir);
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create TLS Secret");
}

/// The Standard example domain as `name` in `ns`, for PEC `domain` on
/// `sites`, signed by the SigningKey `key`, its TLS and mailboxes Secrets
/// named `<name>-tls` and `<name>-mailboxes`, scanning with the tests'
/// clamd, and without the example's routes and providers.
pub fn standard_domain(
    name: &str,
    ns: &str,
    domain: &str,
    sites: &[String],
    key: &str,
) -> MailDomain {
    let mut md: MailDomain = example("20-maildomain-standard.yaml");
    md.metadata.name = Some(name.into());
    md.metadata.namespace = Some(ns.into());
    md.spec.domain = domain.into();
    md.spec.sites = sites.to_vec();
    md.spec.signing_key_ref = Some(key.into());
    md.spec.gateway.tls_secret_ref = Some(format!("{name}-tls"));
    md.spec.gateway.mailboxes_secret_ref = Some(format!("{name}-mailboxes"));
    md.spec.gateway.providers.clear();
    md.spec.gateway.relay.routes.clear();
    // Each test names its own store, if any.
    md.spec.gateway.storage_claim_name = None;
    md.spec.antivirus.clamd = Some(
        std::env::var("PEC_E2E_CLAMD").expect("e2e/test.sh starts clamd and sets PEC_E2E_CLAMD"),
    );
    md
}

/// A self-signed SigningKey `name` for PEC `domain` (with `extra` spec
/// fields on top), created in `ns` and Ready.
pub async fn domain_key(
    client: &Client,
    ns: &str,
    name: &str,
    domain: &str,
    extra: serde_json::Value,
) {
    let mut spec = json!({
        "subject": {"commonName": domain, "organization": "Example PEC S.p.A.", "country": "IT"},
        "dnsNames": [domain],
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    let keys = create_key(
        client,
        ns,
        &signing_key(name, json!({"selfSigned": {}}), spec),
    )
    .await;
    wait_ready(&keys, name).await;
}

/// The TLS and mailboxes Secrets [`standard_domain`] names for `name`: a
/// self-signed certificate for `domain`, and the probe mailbox `sla-probe`
/// with `password`.
pub async fn domain_secrets(client: &Client, ns: &str, name: &str, domain: &str, password: &str) {
    tls_secret(client, ns, &format!("{name}-tls"), &[domain]).await;
    string_secret(
        client,
        ns,
        &format!("{name}-mailboxes"),
        json!({"mailboxes": format!("{MAILBOX}:{}\n", password_hash(password))}),
    )
    .await;
}

/// The Secret `name` whose key `password` is a probe mailbox's password,
/// as the operator reads it (`probe.pecRoundTrip.passwordSecretRef`).
pub async fn password_secret(client: &Client, ns: &str, name: &str, password: &str) {
    string_secret(client, ns, name, json!({"password": password})).await;
}

/// A Secret with `stringData`.
pub async fn string_secret(client: &Client, ns: &str, name: &str, data: serde_json::Value) {
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data}))
            .expect("secret");
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create Secret");
}

/// The PHC hash of `password`, by `pec-gateway passwd` as the README says.
pub fn password_hash(password: &str) -> String {
    use std::io::Write;
    let binary = std::env::var("PEC_E2E_GATEWAY").expect("e2e/test.sh sets PEC_E2E_GATEWAY");
    let mut child = Command::new(binary)
        .arg("passwd")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("pec-gateway passwd");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(password.as_bytes())
        .expect("write the password");
    let out = child.wait_with_output().expect("passwd output");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

fn object(s: Option<&SlaTarget>) -> Option<&SlaObjectStatus> {
    s.and_then(|s| s.status.as_ref())
        .and_then(|st| st.objects.first())
}

#[tokio::test]
async fn a_round_trip_probe_records_an_outage_while_the_gateway_cannot_sign() {
    let client = client().await;
    let ns = namespace(&client, "sla-round-trip").await;
    let sites =
        TestSites::create(&client, &format!("rt{}", std::process::id()), fast_health()).await;

    // The key, in a token of its own (a wrong-PIN login rewrites its files).
    pin_secret(&client, &ns, &real_pin()).await;
    let token = std::env::var("PEC_E2E_HSM_TOKEN_PROBE").expect("e2e/lib/hsm.sh sets it");
    let hsm = json!({"hsm": {"tokenLabel": token, "pinSecretRef": {"name": PIN_SECRET}}});
    domain_key(&client, &ns, "probe-key", DOMAIN, hsm).await;

    let password = format!("probe-{}", std::process::id());
    domain_secrets(&client, &ns, "probed", DOMAIN, &password).await;
    let md = standard_domain("probed", &ns, DOMAIN, &sites.names, "probe-key");
    let mds = Api::<MailDomain>::namespaced(client.clone(), &ns);
    mds.create(&PostParams::default(), &md)
        .await
        .expect("create MailDomain");
    wait_for(
        &mds,
        "probed",
        "Ready=True",
        has_condition("Ready", "True", None),
    )
    .await;

    let mut gateway = local_gateway(&client, &ns, &md, &sites.names[0]).await;
    gateway.start(&real_pin());
    eventually("the gateway ready with the right PIN", || async {
        (gateway.http_status("/readyz") == Some(200)).then_some(())
    })
    .await;

    // The probe, before its password Secret exists: not measured, and told why.
    let slas = Api::<SlaTarget>::namespaced(client.clone(), &ns);
    let sla = measure(
        &client,
        &ns,
        "probed",
        json!({"probe": {
            "kind": "PecRoundTrip",
            "intervalSeconds": 1,
            "timeoutSeconds": 10,
            "pecRoundTrip": {
                "mailbox": MAILBOX,
                "passwordSecretRef": {"name": "probe-password"},
                "submissionAddress": gateway.config.listen.submissions,
                "apiAddress": gateway.config.listen.https,
            },
        }}),
    )
    .await;
    let waiting = wait_for(
        &slas,
        &sla,
        "Ready=False ProbeSecretNotFound",
        has_condition("Ready", "False", Some("ProbeSecretNotFound")),
    )
    .await;
    assert!(
        condition(&waiting, "Ready")
            .message
            .contains("probe-password")
    );
    assert!(object(Some(&waiting)).is_none_or(|o| o.period.measured_seconds == 0.0));

    password_secret(&client, &ns, "probe-password", &password).await;
    wait_for(
        &slas,
        &sla,
        "a first successful round trip",
        |s: Option<&SlaTarget>| {
            object(s).is_some_and(|o| o.period.measured_seconds > 0.0 && o.ongoing_outage.is_none())
        },
    )
    .await;
    wait_for(
        &slas,
        &sla,
        "Ready=True",
        has_condition("Ready", "True", None),
    )
    .await;

    // A wrong PIN: the gateway runs and answers, but cannot sign.
    gateway.stop();
    let broken_at = Instant::now();
    gateway.start("0000-not-the-pin");
    assert_ne!(
        gateway.http_status("/readyz"),
        Some(200),
        "ready without a usable key"
    );
    let during = wait_for(
        &slas,
        &sla,
        "the outage in status",
        |s: Option<&SlaTarget>| object(s).is_some_and(|o| o.ongoing_outage.is_some()),
    )
    .await;
    let ongoing = object(Some(&during))
        .and_then(|o| o.ongoing_outage.clone())
        .expect("ongoing outage");
    assert_eq!(ongoing.cause, "NoAcceptance");
    // Held a few seconds with the gateway up: the outage is the signing,
    // not the restart.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(gateway.http_status("/healthz") == Some(200));
    let still = slas.get(&sla).await.expect("SlaTarget");
    assert!(
        object(Some(&still)).is_some_and(|o| o.ongoing_outage.is_some()),
        "the outage closed while the gateway had the wrong PIN"
    );

    // The right PIN again: the outage closes.
    gateway.stop();
    gateway.start(&real_pin());
    let down_for = broken_at.elapsed().as_secs_f64();
    let done = wait_for(&slas, &sla, "the closed outage", |s: Option<&SlaTarget>| {
        object(s).is_some_and(|o| o.ongoing_outage.is_none() && o.period.latest_outage.is_some())
    })
    .await;
    let outage = object(Some(&done))
        .and_then(|o| o.period.latest_outage.clone())
        .expect("the outage");
    println!(
        "PecRoundTrip outage: {:.1}s measured by the operator, {down_for:.1}s with a broken gateway by the test",
        outage.seconds
    );
    assert_eq!(outage.cause, "NoAcceptance");
    assert_eq!(object(Some(&done)).map(|o| o.period.outages), Some(1));
    // The operator saw it start within a probe round of the break and end
    // within one of the fix (a round here is the 1 s interval plus a round
    // trip of well under a second; the margin is for a loaded machine).
    assert!(
        (outage.seconds - down_for).abs() <= 5.0,
        "operator {:.1}s vs broken {down_for:.1}s",
        outage.seconds
    );

    // The probe cleans up after itself: at most one round's messages left.
    Api::<SlaTarget>::namespaced(client.clone(), &ns)
        .delete(&sla, &Default::default())
        .await
        .expect("delete SlaTarget");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let left = gateway.probe_messages();
    assert!(left <= 3, "{left} messages left in the probe mailbox");
    sites.remove().await;
}
