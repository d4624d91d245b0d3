//! SigningKeys against the operator, the local cluster and the real SoftHSM2
//! token: each issuer, automatic rotation with no gateway gap, failures,
//! revocation with a CRL, the finalizer, and a PIN that never leaks.
//! Certificates, CSRs and CRLs are checked with `openssl`.

use std::{process::Command, time::Duration};

use base64::Engine;
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use pec_operator::{
    api::{MailDomain, SigningKey, SigningKeyStatus},
    controllers::{
        handover::{Part, held_by},
        signing_key::{issue::certificate_requests, publish::PLATFORM_PROVIDERS},
    },
    hsm::key_id,
};
use serde_json::json;

use crate::{
    datacenter::endpoints_by_site,
    failover::{World, fast_health, world},
    harness::{client, eventually, has_condition, namespace, scrape_all, wait_for},
    hsm::token,
};

pub const PIN_SECRET: &str = "hsm-pin";

/// Creates the PIN Secret in `ns` holding `pin`.
pub async fn pin_secret(client: &Client, ns: &str, pin: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": PIN_SECRET},
        "stringData": {"pin": pin},
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create PIN Secret");
}

/// The test token's PIN.
pub fn real_pin() -> String {
    std::env::var("PEC_E2E_HSM_PIN").expect("e2e/test.sh sets PEC_E2E_HSM_PIN")
}

/// A SigningKey manifest named `name` with `issuer` and `extra` spec fields.
pub fn signing_key(name: &str, issuer: serde_json::Value, extra: serde_json::Value) -> SigningKey {
    serde_json::from_value(manifest(name, issuer, extra)).expect("SigningKey manifest")
}

/// The JSON of [`signing_key`], which may be invalid on purpose.
fn manifest(name: &str, issuer: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    let mut spec = json!({
        "hsm": {
            "tokenLabel": std::env::var("PEC_E2E_HSM_TOKEN").expect("e2e/test.sh sets PEC_E2E_HSM_TOKEN"),
            "pinSecretRef": {"name": PIN_SECRET},
        },
        "subject": {"commonName": "pec.example.it", "organization": "Example PEC S.p.A.", "country": "IT"},
        "dnsNames": ["pec.example.it"],
        "certificate": {"duration": "2160h", "renewBefore": "720h"},
        "publication": {"delay": "24h"},
        "issuer": issuer,
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    json!({
        "apiVersion": "pec.dev/v1alpha1",
        "kind": "SigningKey",
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// A fresh namespace for `test` with the PIN Secret and the SigningKey `sk`.
async fn new_key(test: &str, sk: &SigningKey) -> (Client, String, Api<SigningKey>) {
    let client = client().await;
    let ns = namespace(&client, test).await;
    pin_secret(&client, &ns, &real_pin()).await;
    let api = create_key(&client, &ns, sk).await;
    (client, ns, api)
}

pub async fn create_key(client: &Client, ns: &str, sk: &SigningKey) -> Api<SigningKey> {
    let api = Api::<SigningKey>::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), sk)
        .await
        .expect("create SigningKey");
    api
}

fn status(sk: &SigningKey) -> SigningKeyStatus {
    sk.status.clone().unwrap_or_default()
}

pub fn current_generation(sk: Option<&SigningKey>) -> Option<i64> {
    sk.and_then(|s| s.status.as_ref())
        .and_then(|s| s.current.as_ref())
        .map(|c| c.generation)
}

/// A directory for openssl files, removed when dropped.
struct Files(std::path::PathBuf);

impl Files {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("pec-e2e-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn put(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs openssl; returns (success, stdout + stderr).
fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A throwaway CA made by openssl: (certificate PEM, PKCS#8 key PEM).
fn make_ca(files: &Files) -> (String, String) {
    let (ok, out) = openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &files.path("ca.key"),
        "-out",
        &files.path("ca.crt"),
        "-subj",
        "/CN=PEC Test CA/O=Test",
        "-days",
        "2",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    assert!(ok, "openssl made no CA: {out}");
    let read = |n| std::fs::read_to_string(files.path(n)).expect("read");
    (read("ca.crt"), read("ca.key"))
}

async fn ca_secret(client: &Client, ns: &str, name: &str, cert: &str, key: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": cert, "tls.key": key},
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create CA Secret");
}

/// Signs `csr_pem` with the CA in `files`, as an accredited CA would.
fn sign_csr(files: &Files, csr_pem: &str, out: &str) -> String {
    let csr = files.put("req.csr", csr_pem);
    let (ok, text) = openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &files.path("ca.crt"),
        "-CAkey",
        &files.path("ca.key"),
        "-days",
        "30",
        "-copy_extensions",
        "copy",
        "-out",
        &files.path(out),
    ]);
    assert!(ok, "openssl did not sign the CSR: {text}");
    std::fs::read_to_string(files.path(out)).expect("signed")
}

/// The key of `sk`'s generation `n` in the token: exactly one, sensitive,
/// and non-extractable.
fn assert_one_protected_key(sk: &SigningKey, n: u32) {
    let id = key_id(&sk.uid().expect("uid"), n);
    let token = token();
    assert_eq!(token.count_keys(&id).expect("count"), 1, "one key object");
    let key = token
        .ensure_key(
            &id,
            "never made here",
            pec_operator::hsm::Algorithm::EcdsaP256,
            false,
        )
        .expect("find the key");
    let p = token.protection(key).expect("attributes");
    assert!(p.token && p.sensitive && p.always_sensitive, "{p:?}");
    assert!(!p.extractable && p.never_extractable, "{p:?}");
}

/// The certificate of the current generation certifies the token's key.
fn assert_certifies_token_key(files: &Files, sk: &SigningKey, pem: &str) {
    let n = u32::try_from(status(sk).current.expect("current").generation).expect("n");
    let spki = token()
        .public_key(&key_id(&sk.uid().expect("uid"), n))
        .expect("public key");
    let cert = files.put("check.crt", pem);
    let (ok, out) = openssl(&["x509", "-in", &cert, "-noout", "-pubkey"]);
    assert!(ok, "{out}");
    let token_pem = pec_operator::hsm::der::pem("PUBLIC KEY", &spki);
    assert_eq!(
        out.trim(),
        token_pem.trim(),
        "the certificate is for the key in the token"
    );
}

pub async fn wait_ready(api: &Api<SigningKey>, name: &str) -> SigningKey {
    wait_for(
        api,
        name,
        "Ready=True",
        has_condition("Ready", "True", None),
    )
    .await
}

#[tokio::test]
async fn a_self_signed_key_is_made_in_the_token_and_its_certificate_verifies() {
    let (client, ns, api) = new_key(
        "sk-self-signed",
        &signing_key("self", json!({"selfSigned": {}}), json!({})),
    )
    .await;
    let sk = wait_ready(&api, "self").await;
    let current = status(&sk).current.expect("current");
    assert_eq!((current.generation, current.phase.as_str()), (1, "Active"));
    assert_one_protected_key(&sk, 1);
    let files = Files::new("self");
    let pem = current.certificate.expect("certificate");
    let cert = files.put("self.crt", &pem);
    let (ok, out) = openssl(&[
        "verify",
        "-check_ss_sig",
        "-partial_chain",
        "-CAfile",
        &cert,
        &cert,
    ]);
    assert!(ok, "openssl verify: {out}");
    let (_, text) = openssl(&["x509", "-in", &cert, "-noout", "-text"]);
    assert!(text.contains("ecdsa-with-SHA256"), "{text}");
    assert!(text.contains("DNS:pec.example.it"), "{text}");
    assert!(text.contains("Non Repudiation"), "{text}");
    assert_certifies_token_key(&files, &sk, &pem);
    // Published for the providers' index, with the printer columns' fields.
    let published = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("self-certificates")
        .await
        .expect("publication Secret");
    assert!(published.data.expect("data").contains_key("g1.crt"));
    let index = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("self-index")
        .await
        .expect("index ConfigMap");
    assert!(index.data.expect("data")["index.yaml"].contains(&current.serial.expect("serial")));
    assert!(status(&sk).renewal_time.is_some());
    let series = format!(
        "pec_certificate_not_after_timestamp_seconds{{namespace=\"{ns}\",signingkey=\"self\"}}"
    );
    eventually("the expiry metric for the key", || async {
        scrape_all()
            .await
            .lines()
            .any(|l| l.starts_with(&series))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn rsa_keys_get_certificates_signed_in_the_token() {
    let (_, _, api) = new_key(
        "sk-rsa",
        &signing_key(
            "rsa",
            json!({"selfSigned": {}}),
            json!({"algorithm": "RSA-3072"}),
        ),
    )
    .await;
    let sk = wait_ready(&api, "rsa").await;
    let files = Files::new("rsa");
    let pem = status(&sk)
        .current
        .and_then(|c| c.certificate)
        .expect("cert");
    let cert = files.put("rsa.crt", &pem);
    let (ok, out) = openssl(&[
        "verify",
        "-check_ss_sig",
        "-partial_chain",
        "-CAfile",
        &cert,
        &cert,
    ]);
    assert!(ok, "openssl verify: {out}");
    let (_, text) = openssl(&["x509", "-in", &cert, "-noout", "-text"]);
    assert!(
        text.contains("sha256WithRSAEncryption") && text.contains("3072 bit"),
        "{text}"
    );
    assert_certifies_token_key(&files, &sk, &pem);
}

#[tokio::test]
async fn the_ca_issuer_signs_and_revocation_rotates_at_once_into_the_crl() {
    let client = client().await;
    let ns = namespace(&client, "sk-ca-revoke").await;
    pin_secret(&client, &ns, &real_pin()).await;
    let files = Files::new("ca");
    let (ca_cert, ca_key) = make_ca(&files);
    ca_secret(&client, &ns, "test-ca", &ca_cert, &ca_key).await;
    let api = create_key(
        &client,
        &ns,
        &signing_key("ca", json!({"ca": {"secretName": "test-ca"}}), json!({})),
    )
    .await;
    let sk = wait_ready(&api, "ca").await;
    let first = status(&sk).current.expect("current");
    let old_pem = first.certificate.clone().expect("cert");
    let old = files.put("old.crt", &old_pem);
    let (ok, out) = openssl(&["verify", "-CAfile", &files.path("ca.crt"), &old]);
    assert!(ok, "CA-signed certificate verifies: {out}");
    assert_certifies_token_key(&files, &sk, &old_pem);

    // Compromise: a 24h publication delay, yet the successor is active at once.
    api.patch(
        "ca",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"revoke": {"reason": "KeyCompromise", "generation": 1}}})),
    )
    .await
    .expect("declare the compromise");
    let sk = wait_for(
        &api,
        "ca",
        "generation 2 active",
        |s: Option<&SigningKey>| current_generation(s) == Some(2),
    )
    .await;
    let st = status(&sk);
    assert!(st.current.as_ref().is_some_and(|c| c.emergency));
    assert_eq!(st.revoked.len(), 1);
    assert_eq!(st.revoked[0].serial, first.serial);
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Revoked" && c.status == "True")
    );
    assert_eq!(
        token()
            .count_keys(&key_id(&sk.uid().expect("uid"), 2))
            .expect("count"),
        1
    );
    let crl_secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("ca-crl")
        .await
        .expect("CRL Secret");
    let crl_pem =
        String::from_utf8(crl_secret.data.expect("data")["ca.crl"].0.clone()).expect("pem");
    let crl = files.put("ca.crl", &crl_pem);
    let (ok, text) = openssl(&[
        "crl",
        "-in",
        &crl,
        "-noout",
        "-text",
        "-CAfile",
        &files.path("ca.crt"),
    ]);
    assert!(
        ok && text.contains("verify OK"),
        "CRL signed by the CA: {text}"
    );
    let serial = first.serial.clone().expect("serial").to_uppercase();
    assert!(
        text.to_uppercase().contains(&serial),
        "the CRL lists {serial}: {text}"
    );
    assert!(text.contains("Key Compromise"), "{text}");
    let (ok, out) = openssl(&[
        "verify",
        "-crl_check",
        "-CAfile",
        &files.path("ca.crt"),
        "-CRLfile",
        &crl,
        &old,
    ]);
    assert!(
        !ok && out.contains("revoked"),
        "the old certificate is revoked: {out}"
    );
    let new = files.put(
        "new.crt",
        &st.current.and_then(|c| c.certificate).expect("new cert"),
    );
    let (ok, out) = openssl(&[
        "verify",
        "-crl_check",
        "-CAfile",
        &files.path("ca.crt"),
        "-CRLfile",
        &crl,
        &new,
    ]);
    assert!(ok, "the new certificate verifies against the CRL: {out}");
    let published = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("ca-certificates")
        .await
        .expect("publication");
    let data = published.data.expect("data");
    assert!(
        data.contains_key("g2.crt") && !data.contains_key("g1.crt"),
        "the revoked certificate is withdrawn"
    );
    let events = crate::harness::events_of(&client, &ns, "ca").await;
    assert!(
        events.iter().any(|(t, r)| t == "Warning" && r == "Revoked"),
        "{events:?}"
    );
}

#[tokio::test]
async fn the_external_issuer_waits_for_a_matching_certificate() {
    let client = client().await;
    let ns = namespace(&client, "sk-external").await;
    pin_secret(&client, &ns, &real_pin()).await;
    let files = Files::new("ext");
    make_ca(&files);
    let api = create_key(
        &client,
        &ns,
        &signing_key(
            "ext",
            json!({"external": {"certificateSecretName": "ext-signed"}}),
            json!({}),
        ),
    )
    .await;
    let sk = wait_for(
        &api,
        "ext",
        "awaiting the external signature",
        has_condition("Issuing", "True", Some("AwaitingExternalSignature")),
    )
    .await;
    let csr_pem = status(&sk).next.and_then(|n| n.csr).expect("CSR in status");
    let from_secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("ext-csr")
        .await
        .expect("CSR Secret");
    assert_eq!(
        String::from_utf8(from_secret.data.expect("data")["csr.pem"].0.clone()).expect("pem"),
        csr_pem
    );
    let csr = files.put("ext.csr", &csr_pem);
    let (ok, out) = openssl(&["req", "-in", &csr, "-verify", "-noout"]);
    assert!(
        ok,
        "the CSR's signature (made in the token) verifies: {out}"
    );

    // A certificate for another key is not used.
    let (ok, out) = openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &files.path("other.key"),
        "-out",
        &files.path("other.crt"),
        "-subj",
        "/CN=other",
        "-days",
        "1",
    ]);
    assert!(ok, "{out}");
    let other = std::fs::read_to_string(files.path("other.crt")).expect("other");
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let signed_secret = |pem: &str| -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": "ext-signed"},
            "data": {"tls.crt": ByteString(pem.as_bytes().to_vec())},
        }))
        .expect("secret")
    };
    secrets
        .create(&PostParams::default(), &signed_secret(&other))
        .await
        .expect("wrong certificate");
    wait_for(
        &api,
        "ext",
        "the mismatch named",
        has_condition("Issuing", "True", Some("CertificateDoesNotMatchKey")),
    )
    .await;

    let signed = sign_csr(&files, &csr_pem, "ext.crt");
    secrets
        .replace(
            "ext-signed",
            &PostParams::default(),
            &signed_secret(&signed),
        )
        .await
        .expect("signed certificate");
    let sk = wait_ready(&api, "ext").await;
    let pem = status(&sk)
        .current
        .and_then(|c| c.certificate)
        .expect("cert");
    let cert = files.put("got.crt", &pem);
    let (ok, out) = openssl(&["verify", "-CAfile", &files.path("ca.crt"), &cert]);
    assert!(ok, "{out}");
    assert_certifies_token_key(&files, &sk, &pem);
    assert_one_protected_key(&sk, 1);
    revocation_asks_a_person(&api, "ext", "Secret ext-signed").await;
}

/// Declares generation 1 of `name` compromised; with an issuer the operator
/// cannot revoke at (external, cert-manager), `status.pendingAction` tells a
/// person what to have revoked: `where` and the generation's serial.
async fn revocation_asks_a_person(api: &Api<SigningKey>, name: &str, r#where: &str) {
    let serial = status(&api.get(name).await.expect("get"))
        .current
        .and_then(|c| c.serial)
        .expect("serial of generation 1");
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"revoke": {"reason": "KeyCompromise", "generation": 1}}})),
    )
    .await
    .expect("declare the compromise");
    let sk = wait_for(api, name, "a pending action", |s: Option<&SigningKey>| {
        s.and_then(|s| s.status.as_ref())
            .is_some_and(|st| st.pending_action.is_some())
    })
    .await;
    let st = status(&sk);
    let action = st.pending_action.clone().expect("pending action");
    assert!(
        action.contains(&serial) && action.contains(r#where),
        "the pending action names {where} and serial {serial}: {action}"
    );
    assert_eq!(
        st.revoked
            .iter()
            .map(|r| r.serial.clone())
            .collect::<Vec<_>>(),
        [Some(serial)]
    );
}

/// A minimal cert-manager CertificateRequest CRD (the fields the operator uses).
async fn ensure_certificate_request_crd(client: &Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "certificaterequests.cert-manager.io"},
        "spec": {
            "group": "cert-manager.io",
            "names": {"kind": "CertificateRequest", "plural": "certificaterequests", "singular": "certificaterequest", "listKind": "CertificateRequestList"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
            }],
        },
    }))
    .expect("crd");
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let _ = api
        .patch(
            "certificaterequests.cert-manager.io",
            &PatchParams::apply("pec-e2e").force(),
            &Patch::Apply(crd),
        )
        .await
        .expect("apply the CertificateRequest CRD");
    eventually("the CertificateRequest CRD to be served", || async {
        let crs = certificate_requests(client, "default");
        crs.list(&ListParams::default()).await.ok().map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn a_cert_manager_certificate_request_carries_the_csr_and_brings_the_certificate() {
    let client = client().await;
    ensure_certificate_request_crd(&client).await;
    let ns = namespace(&client, "sk-cert-manager").await;
    pin_secret(&client, &ns, &real_pin()).await;
    let files = Files::new("cm");
    make_ca(&files);
    let api = create_key(
        &client,
        &ns,
        &signing_key(
            "cm",
            json!({"certManager": {"issuerRef": {"name": "pec-ca"}}}),
            json!({}),
        ),
    )
    .await;
    let requests = certificate_requests(&client, &ns);
    let request: DynamicObject = eventually("the CertificateRequest", || async {
        requests.get_opt("cm-g1").await.ok().flatten()
    })
    .await;
    let spec = &request.data["spec"];
    assert_eq!(spec["issuerRef"]["name"], "pec-ca");
    let csr_pem = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(spec["request"].as_str().expect("request"))
            .expect("base64"),
    )
    .expect("pem");
    let csr = files.put("cm.csr", &csr_pem);
    let (ok, out) = openssl(&["req", "-in", &csr, "-verify", "-noout"]);
    assert!(ok, "{out}");
    // The test plays cert-manager's signer.
    let signed = sign_csr(&files, &csr_pem, "cm.crt");
    requests
        .patch_status(
            "cm-g1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "certificate": base64::engine::general_purpose::STANDARD.encode(&signed),
                "conditions": [{"type": "Ready", "status": "True", "reason": "Issued"}],
            }})),
        )
        .await
        .expect("sign the request");
    let sk = wait_ready(&api, "cm").await;
    let pem = status(&sk)
        .current
        .and_then(|c| c.certificate)
        .expect("cert");
    let cert = files.put("got.crt", &pem);
    let (ok, out) = openssl(&["verify", "-CAfile", &files.path("ca.crt"), &cert]);
    assert!(ok, "{out}");
    assert_certifies_token_key(&files, &sk, &pem);
    revocation_asks_a_person(&api, "cm", "CertificateRequest cm-g1").await;
}

#[tokio::test]
async fn a_short_lived_certificate_rotates_by_itself_with_no_gateway_gap() {
    let World {
        client,
        ns,
        sites,
        md,
    } = world(
        "sk-rotation",
        "rot",
        fast_health(),
        pec_operator::api::FailoverMode::ActiveActive,
        1,
    )
    .await;
    pin_secret(&client, &ns, &real_pin()).await;
    let delay = 8;
    let api = create_key(
        &client,
        &ns,
        &signing_key(
            "rot",
            json!({"selfSigned": {}}),
            json!({
                "certificate": {"duration": "75s", "renewBefore": "50s"},
                "publication": {"delay": format!("{delay}s")},
                "retiredKeyPolicy": "Destroy",
            }),
        ),
    )
    .await;
    wait_ready(&api, "rot").await;
    let uid = api.get("rot").await.expect("get").uid().expect("uid");
    let keys = |generation| {
        token()
            .count_keys(&key_id(&uid, generation))
            .expect("count")
    };
    let domains = Api::<MailDomain>::namespaced(client.clone(), &ns);
    domains
        .patch(
            &md,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"signingKeyRef": "rot"}})),
        )
        .await
        .expect("name the key");
    wait_for(
        &domains,
        &md,
        "gateways on generation 1",
        |m: Option<&MailDomain>| {
            m.and_then(|m| m.status.as_ref())
                .and_then(|s| s.signing_key_generation)
                == Some(1)
        },
    )
    .await;

    // Watch until the gateways run generation 2: endpoints in every site at
    // every look, the certificate published at least `delay` before use.
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let configs = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let start = tokio::time::Instant::now();
    let (mut published_at, mut configured_at) = (None, None);
    let mut looks = 0;
    loop {
        let by_site = endpoints_by_site(&client, &ns, &md).await;
        for site in &sites.names {
            assert!(
                by_site.get(site).copied().unwrap_or(0) >= 1,
                "site {site} had no ready gateway at {:?}: {by_site:?}",
                start.elapsed()
            );
        }
        looks += 1;
        if published_at.is_none()
            && secrets
                .get_opt("rot-certificates")
                .await
                .expect("get")
                .and_then(|s| s.data)
                .is_some_and(|d| d.contains_key("g2.crt"))
        {
            published_at = Some(start.elapsed());
        }
        if configured_at.is_none()
            && configs
                .list(&ListParams::default().labels(&format!(
                    "{}={md}",
                    pec_operator::controllers::mail_domain::build::DOMAIN_LABEL
                )))
                .await
                .expect("list")
                .items
                .iter()
                .any(|c| {
                    c.data
                        .as_ref()
                        .and_then(|d| d.get("gateway.yaml"))
                        .is_some_and(|y| y.contains("generation: 2"))
                })
        {
            configured_at = Some(start.elapsed());
        }
        // The key is counted before the domain's generation is read: a
        // domain still on generation 1 after the count was on it during the
        // count too, so the key must have been there. (Counted after, the
        // domain could move on and the key go in between: logging in to
        // the token can take seconds while the operators rewrite it.)
        let generation_1_keys = keys(1);
        let generation = domains
            .get(&md)
            .await
            .expect("get")
            .status
            .and_then(|s| s.signing_key_generation);
        if generation == Some(2) {
            break;
        }
        // `Destroy` waits for every domain: generation 1 signs until then.
        assert_eq!(
            generation_1_keys, 1,
            "generation 1's key destroyed while the domain used it"
        );
        assert!(
            start.elapsed() < Duration::from_secs(150),
            "no rotation within 150 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (published, configured) = (
        published_at.expect("published"),
        configured_at.expect("configured"),
    );
    assert!(
        configured >= published + Duration::from_secs(delay) - Duration::from_millis(500),
        "published at {published:?}, used at {configured:?}: less than the {delay}s delay"
    );
    let sk = api.get("rot").await.expect("get");
    let st = status(&sk);
    assert_eq!(st.current.as_ref().map(|c| c.generation), Some(2));
    assert_eq!(
        st.previous
            .as_ref()
            .map(|c| (c.generation, c.phase.as_str())),
        Some((1, "Retired"))
    );
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Expiring" && c.status == "False"),
        "a rotation on time is not expiring"
    );
    eprintln!("rotation watched over {looks} looks; published {published:?}, used {configured:?}");
    // Every domain has rolled: `Destroy` removes generation 1's key, not 2's.
    eventually("generation 1's key destroyed", || async {
        (keys(1) == 0).then_some(())
    })
    .await;
    assert_eq!(keys(2), 1, "the key in use is kept");
    eventually("a KeyDestroyed Event", || async {
        crate::harness::events_of(&client, &ns, "rot")
            .await
            .iter()
            .any(|(_, reason)| reason == "KeyDestroyed")
            .then_some(())
    })
    .await;
    sites.remove().await;
}

/// The field manager the SigningKey controller applied under before it was
/// named like the other controllers.
const LEGACY_MANAGER: &str = "pec-operator";

#[tokio::test]
async fn what_the_old_field_manager_applied_is_handed_to_the_current_one() {
    // A key that renews 15 s after issue: its second generation is
    // published soon, which is when its publication is written again.
    let (client, ns, api) = new_key(
        "sk-handover",
        &signing_key(
            "handover",
            json!({"selfSigned": {}}),
            json!({
                "certificate": {"duration": "75s", "renewBefore": "60s"},
                "publication": {"delay": "8s"},
            }),
        ),
    )
    .await;
    let ready = wait_ready(&api, "handover").await;
    assert!(
        held_by(&ready.metadata, "pec-operator/signingkey", Part::Status),
        "the status is applied under the controller's own name"
    );

    // What an operator of the old release left: the status and the
    // publication applied as `pec-operator`, the publication with a key the
    // current release does not write.
    let legacy = PatchParams::apply(LEGACY_MANAGER).force();
    api.patch_status(
        "handover",
        &legacy,
        &Patch::Apply(json!({
            "apiVersion": "pec.dev/v1alpha1",
            "kind": "SigningKey",
            "status": ready.status,
        })),
    )
    .await
    .expect("apply the status as the old manager");
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let published = secrets
        .get("handover-certificates")
        .await
        .expect("publication");
    let mut data = published.data.clone().unwrap_or_default();
    assert!(data.contains_key("g1.crt"), "generation 1 published");
    data.insert(
        "stale.crt".into(),
        ByteString(b"left by the old release".to_vec()),
    );
    secrets
        .patch(
            "handover-certificates",
            &legacy,
            &Patch::Apply(json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "handover-certificates"},
                "data": data,
            })),
        )
        .await
        .expect("apply the publication as the old manager");

    // The status: taken over at the next reconcile (the apply above is a
    // change of the key), unchanged.
    let taken = eventually("the status released by the old manager", || async {
        let sk = api.get("handover").await.expect("get");
        (!held_by(&sk.metadata, LEGACY_MANAGER, Part::Status)).then_some(sk)
    })
    .await;
    assert!(
        held_by(&taken.metadata, "pec-operator/signingkey", Part::Status),
        "the current name holds the status"
    );
    let st = status(&taken);
    assert_eq!(st.current.as_ref().map(|c| c.generation), Some(1));
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "still Ready after the hand-over: {:?}",
        st.conditions
    );

    // The publication: handed over when generation 2 is published, and
    // the key only the old name held is gone with it.
    let after = eventually("generation 2 published", || async {
        let s = secrets.get("handover-certificates").await.expect("get");
        s.data
            .as_ref()
            .is_some_and(|d| d.contains_key("g2.crt"))
            .then_some(s)
    })
    .await;
    assert!(
        !held_by(&after.metadata, LEGACY_MANAGER, Part::Object),
        "the old manager still holds the publication: {:?}",
        after.metadata.managed_fields
    );
    let keys: Vec<&String> = after
        .data
        .as_ref()
        .map(|d| d.keys().collect())
        .unwrap_or_default();
    assert!(
        !keys.iter().any(|k| k.as_str() == "stale.crt"),
        "a key only the old manager held outlived the hand-over: {keys:?}"
    );
    assert!(
        keys.iter().any(|k| k.as_str() == "g1.crt"),
        "generation 1 is still published: {keys:?}"
    );
}

#[tokio::test]
async fn a_failing_issuer_backs_off_keeps_the_key_in_use_and_raises_expiring() {
    let client = client().await;
    let ns = namespace(&client, "sk-failing").await;
    pin_secret(&client, &ns, &real_pin()).await;
    let files = Files::new("fail");
    let (ca_cert, ca_key) = make_ca(&files);
    ca_secret(&client, &ns, "fail-ca", &ca_cert, &ca_key).await;
    let api = create_key(
        &client,
        &ns,
        &signing_key(
            "fail",
            json!({"ca": {"secretName": "fail-ca"}}),
            json!({
                "certificate": {"duration": "600s", "renewBefore": "590s"},
                "publication": {"delay": "5s"},
            }),
        ),
    )
    .await;
    wait_ready(&api, "fail").await;
    // The CA goes away: the renewal, due within seconds, fails.
    Api::<Secret>::namespaced(client.clone(), &ns)
        .delete("fail-ca", &DeleteParams::default())
        .await
        .expect("delete the CA");
    let sk = wait_for(
        &api,
        "fail",
        "Expiring=True",
        has_condition("Expiring", "True", None),
    )
    .await;
    let st = status(&sk);
    let backoff = st.backoff.clone().expect("backoff in status");
    assert_eq!(backoff.reason.as_deref(), Some("CaSecretMissing"));
    assert!(backoff.failures >= 1 && backoff.retry_at.is_some());
    assert_eq!(
        st.current.as_ref().map(|c| c.generation),
        Some(1),
        "the key in use is untouched"
    );
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );
    // The gauge is computed from the operator's informer at scrape time,
    // which sees the status a moment after the API server does.
    let line = format!("pec_certificate_expiring{{namespace=\"{ns}\",signingkey=\"fail\"}} 1");
    let metrics = eventually("the expiring metric", || async {
        let m = scrape_all().await;
        m.lines().any(|l| l == line).then_some(m)
    })
    .await;
    assert!(
        metrics.lines().any(|l| {
            l.starts_with("pec_signing_key_failures_total{")
                && l.contains(&format!("namespace=\"{ns}\""))
                && l.contains("signingkey=\"fail\"")
                && l.contains("reason=\"CaSecretMissing\"")
        }),
        "failure counter"
    );
    // A real Prometheus with the shipped operational rules raises
    // PecCertificateExpiring for this key (pending: its `for` of 10 minutes,
    // which promtool tests, is longer than this test) and PecSigningKeyFailing,
    // each naming the key.
    let prometheus = crate::prometheus::RealPrometheus::start("expiring").await;
    let key = [("namespace", ns.as_str()), ("signingkey", "fail")];
    let expiring = prometheus
        .alert("PecCertificateExpiring", &key, &["pending", "firing"])
        .await;
    assert_eq!(expiring["labels"]["severity"], "warning");
    let summary = expiring["annotations"]["summary"]
        .as_str()
        .unwrap_or_default();
    assert!(
        summary.contains(&format!("SigningKey {ns}/fail")),
        "{summary}"
    );
    let failing = prometheus
        .alert("PecSigningKeyFailing", &key, &["firing"])
        .await;
    assert_eq!(failing["labels"]["reason"], "CaSecretMissing");
    assert!(
        failing["annotations"]["runbook_url"]
            .as_str()
            .is_some_and(|u| u.ends_with("/docs/runbooks.md#pecsigningkeyfailing")),
        "{failing}"
    );
    prometheus.stop().await;
    let events = crate::harness::events_of(&client, &ns, "fail").await;
    assert!(
        events
            .iter()
            .any(|(t, r)| t == "Warning" && r == "Expiring"),
        "{events:?}"
    );
    // The CA is back: the retry (30 s after the first failure) issues generation 2.
    ca_secret(&client, &ns, "fail-ca", &ca_cert, &ca_key).await;
    wait_for(&api, "fail", "generation 2", |s: Option<&SigningKey>| {
        current_generation(s) == Some(2)
    })
    .await;
}

#[tokio::test]
async fn a_wrong_pin_is_reported_retried_and_never_printed() {
    let client = client().await;
    let ns = namespace(&client, "sk-wrong-pin").await;
    let wrong = format!("wrong-{}", std::process::id());
    pin_secret(&client, &ns, &wrong).await;
    // On a token of its own: failed logins rewrite the token's files, which
    // the other tests' processes must not catch half-written.
    let token = std::env::var("PEC_E2E_HSM_TOKEN_WRONG_PIN")
        .expect("e2e/test.sh sets PEC_E2E_HSM_TOKEN_WRONG_PIN");
    let hsm = json!({"tokenLabel": token, "pinSecretRef": {"name": PIN_SECRET}});
    let api = create_key(
        &client,
        &ns,
        &signing_key("pin", json!({"selfSigned": {}}), json!({"hsm": hsm})),
    )
    .await;
    let sk = wait_for(
        &api,
        "pin",
        "a login failure in status",
        |s: Option<&SigningKey>| {
            s.and_then(|s| s.status.as_ref())
                .and_then(|s| s.backoff.as_ref())
                .is_some_and(|b| b.reason.as_deref() == Some("HsmLoginFailed"))
        },
    )
    .await;
    assert!(
        status(&sk)
            .conditions
            .iter()
            .any(|c| c.type_ == "Issuing" && c.reason == "RetryingAfterFailure")
    );
    // The right PIN: the next attempt succeeds.
    Api::<Secret>::namespaced(client.clone(), &ns)
        .patch(
            PIN_SECRET,
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"pin": real_pin()}})),
        )
        .await
        .expect("fix the PIN");
    let sk = wait_ready(&api, "pin").await;
    assert!(status(&sk).backoff.is_none(), "backoff cleared on success");

    // Neither PIN anywhere the operator writes for people or machines.
    let mut seen = String::new();
    let logs = std::env::var("PEC_E2E_LOGS").expect("e2e/test.sh sets PEC_E2E_LOGS");
    for entry in std::fs::read_dir(&logs).expect("logs") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "log") {
            seen.push_str(&std::fs::read_to_string(&path).expect("log"));
        }
    }
    assert!(
        seen.contains("HsmLoginFailed") || seen.contains("logging in"),
        "the logs were captured"
    );
    seen.push_str(&scrape_all().await);
    seen.push_str(&serde_json::to_string(&sk).expect("json"));
    for (t, r) in crate::harness::events_text(&client, &ns).await {
        seen.push_str(&t);
        seen.push_str(&r);
    }
    for pin in [wrong.as_str(), real_pin().as_str()] {
        assert!(!seen.contains(pin), "a PIN leaked");
    }
}

#[tokio::test]
async fn every_gateway_of_a_namespace_trusts_every_key_published_there() {
    let client = client().await;
    let ns = namespace(&client, "sk-platform-providers").await;
    pin_secret(&client, &ns, &real_pin()).await;
    let mut certificates = Vec::new();
    for name in ["first", "second"] {
        let api = create_key(
            &client,
            &ns,
            &signing_key(name, json!({"selfSigned": {}}), json!({})),
        )
        .await;
        let sk = wait_ready(&api, name).await;
        certificates.push(
            status(&sk)
                .current
                .and_then(|c| c.certificate)
                .expect("certificate"),
        );
    }
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let aggregate = || async {
        let cm = config_maps.get(PLATFORM_PROVIDERS).await.ok()?;
        let bundle = cm.data?.get("bundle.crt")?.clone();
        Some(pec_core::smime::pem_certificates(&bundle))
    };
    let der = |pem: &str| pec_core::smime::pem_certificates(pem);
    let both: Vec<Vec<u8>> = certificates.iter().flat_map(|p| der(p)).collect();
    eventually("both keys in the platform providers", || async {
        aggregate().await.filter(|d| *d == both)
    })
    .await;
    // A key that goes takes its certificates out of everyone's trust.
    Api::<SigningKey>::namespaced(client.clone(), &ns)
        .delete("first", &DeleteParams::default())
        .await
        .expect("delete the first key");
    let second = der(&certificates[1]);
    eventually("only the second key left", || async {
        aggregate().await.filter(|d| *d == second)
    })
    .await;
}

#[tokio::test]
async fn deleting_a_key_in_use_is_refused_and_destroy_cleans_the_token() {
    let (client, ns, api) = new_key(
        "sk-finalizer",
        &signing_key(
            "fin",
            json!({"selfSigned": {}}),
            json!({"retiredKeyPolicy": "Destroy"}),
        ),
    )
    .await;
    let sk = wait_ready(&api, "fin").await;
    let id = key_id(&sk.uid().expect("uid"), 1);
    assert_eq!(token().count_keys(&id).expect("count"), 1);
    // A MailDomain names the key (sites need not exist for this).
    let mut md: MailDomain = crate::harness::example("20-maildomain-standard.yaml");
    md.metadata.namespace = Some(ns.clone());
    md.spec.signing_key_ref = Some("fin".into());
    let domains = Api::<MailDomain>::namespaced(client.clone(), &ns);
    domains
        .create(&PostParams::default(), &md)
        .await
        .expect("MailDomain");
    api.delete("fin", &DeleteParams::default())
        .await
        .expect("delete request accepted");
    wait_for(
        &api,
        "fin",
        "deletion refused",
        has_condition("Ready", "False", Some("InUse")),
    )
    .await;
    assert_eq!(
        token().count_keys(&id).expect("count"),
        1,
        "the key is kept"
    );
    domains
        .patch(
            &md.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"signingKeyRef": null}})),
        )
        .await
        .expect("let go of the key");
    eventually("the SigningKey gone", || async {
        api.get_opt("fin")
            .await
            .expect("get")
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(
        token().count_keys(&id).expect("count"),
        0,
        "Destroy removed the key"
    );
}

#[tokio::test]
async fn bad_signing_keys_are_refused_with_the_field_named() {
    let client = client().await;
    let ns = namespace(&client, "sk-validation").await;
    let api = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        &ns,
        &kube::api::ApiResource::erase::<SigningKey>(&()),
    );
    let cases = [
        (
            json!({"certificate": {"duration": "100h", "renewBefore": "200h"}}),
            "renewBefore must be shorter than certificate.duration",
        ),
        (
            json!({"certificate": {"duration": "100h", "renewBefore": "20h"}}),
            "renewBefore must be longer than publication.delay",
        ),
        (
            json!({"certificate": {"duration": "100h", "renewBefore": "30h", "renewBeforePercentage": 10}}),
            "exactly one of certificate.renewBefore",
        ),
        (
            json!({"certificate": {"duration": "two years", "renewBefore": "30h"}}),
            "certificate.duration must be a whole number",
        ),
        (json!({"algorithm": "DSA-1024"}), "algorithm"),
        (json!({"export": "Plaintext"}), "export"),
        (
            json!({"subject": {"commonName": "x", "country": "Italy"}}),
            "two-letter",
        ),
    ];
    for (extra, expected) in cases {
        let sk: DynamicObject =
            serde_json::from_value(manifest("bad", json!({"selfSigned": {}}), extra.clone()))
                .expect("object");
        let err = api
            .create(&PostParams::default(), &sk)
            .await
            .expect_err(&format!("{extra} must be refused"));
        assert!(err.to_string().contains(expected), "{extra}: {err}");
    }
    let both: DynamicObject = serde_json::from_value(manifest(
        "bad",
        json!({"selfSigned": {}, "ca": {"secretName": "x"}}),
        json!({}),
    ))
    .expect("object");
    let err = api
        .create(&PostParams::default(), &both)
        .await
        .expect_err("two issuers");
    assert!(
        err.to_string().contains("exactly one of selfSigned"),
        "{err}"
    );
    // A percentage that leaves no time to publish is reported by the controller.
    let late = signing_key(
        "late",
        json!({"selfSigned": {}}),
        json!({"certificate": {"duration": "100h", "renewBeforePercentage": 10}}),
    );
    let api = create_key(&client, &ns, &late).await;
    wait_for(
        &api,
        "late",
        "InvalidSpec",
        has_condition("Ready", "False", Some("InvalidSpec")),
    )
    .await;
}

#[tokio::test]
async fn a_signing_key_for_another_domain_keeps_the_domain_not_ready_and_says_why() {
    let client = client().await;
    crate::harness::ensure_example_sites(&client).await;
    let ns = namespace(&client, "sk-other-domain").await;
    pin_secret(&client, &ns, &real_pin()).await;
    let api = create_key(
        &client,
        &ns,
        &signing_key(
            "other",
            json!({"selfSigned": {}}),
            json!({
                "subject": {"commonName": "pec.other.it", "organization": "Other", "country": "IT"},
                "dnsNames": ["pec.other.it"],
            }),
        ),
    )
    .await;
    wait_ready(&api, "other").await;
    crate::harness::example_prerequisites(&client, &ns).await;
    let mut md: MailDomain = crate::harness::example("20-maildomain-standard.yaml");
    md.metadata.namespace = Some(ns.clone());
    md.spec.signing_key_ref = Some("other".into());
    let domains = Api::<MailDomain>::namespaced(client.clone(), &ns);
    domains
        .create(&PostParams::default(), &md)
        .await
        .expect("MailDomain");
    let md = wait_for(
        &domains,
        &md.name_any(),
        "Ready=False naming the mismatch",
        has_condition("Ready", "False", Some("SigningKeyDoesNotCoverDomain")),
    )
    .await;
    let ready = md
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .expect("Ready");
    assert!(
        ready.message.contains("pec.other.it") && ready.message.contains("pec.example.it"),
        "{}",
        ready.message
    );
}
