//! Keys in a real PKCS#11 token (SoftHSM2, initialised by e2e/test.sh):
//! generated sensitive and non-extractable, found again by their id instead of
//! made twice, and signing inside the token with signatures openssl verifies.

use std::{
    path::PathBuf,
    process::Command,
    sync::{RwLock, RwLockReadGuard},
};

use cryptoki::types::AuthPin;
use pec_operator::hsm::{Algorithm, Hsm, Token, der, key_id};

/// The SoftHSM2 module, opened at the first use and again after a token
/// was lost (see [`token`]). A [`TestToken`] holds it open (a read lock);
/// reopening takes it whole, when no session is left.
static MODULE: RwLock<Option<Hsm>> = RwLock::new(None);

/// A logged-in session on a test token; the module stays open while it lives.
pub struct TestToken {
    // Dropped first: the session closes before the module may be reopened.
    token: Token,
    _module: RwLockReadGuard<'static, Option<Hsm>>,
}

impl std::ops::Deref for TestToken {
    type Target = Token;

    fn deref(&self) -> &Token {
        &self.token
    }
}

fn open() -> Hsm {
    let module = std::env::var("PEC_PKCS11_MODULE").expect("e2e/test.sh sets PEC_PKCS11_MODULE");
    Hsm::open(&PathBuf::from(module)).expect("the SoftHSM2 module loads")
}

/// Logs in to the token `label` through the shared module.
fn login(label: &str, pin: &AuthPin) -> Result<TestToken, pec_operator::hsm::HsmError> {
    let read = || MODULE.read().unwrap_or_else(|e| e.into_inner());
    let mut module = read();
    if module.is_none() {
        drop(module);
        let mut write = MODULE.write().unwrap_or_else(|e| e.into_inner());
        write.get_or_insert_with(open);
        drop(write);
        module = read();
    }
    let token = module.as_ref().expect("opened above").login(label, pin)?;
    Ok(TestToken {
        token,
        _module: module,
    })
}

/// Finalizes the module and opens it afresh, once no session holds it
/// (waiting up to 20 s; never blocking, so a test holding a session while
/// it asks for another cannot deadlock: it just goes on without).
fn reopen() {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Ok(mut module) = MODULE.try_write() {
            // The old module's drop finalizes it; the new one re-reads the tokens.
            *module = None;
            *module = Some(open());
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    eprintln!("reopening the SoftHSM2 module: sessions still open after 20 s");
}

/// A session on the tests' token. SoftHSM2 keeps a token in files that
/// other processes (the operators) rewrite as they make keys; a process
/// reading them at that moment can find the token unreadable, and the
/// module keeps it so until it is opened again. So a failed login is tried
/// again, and every few failures the module is reopened.
pub fn token() -> TestToken {
    let label = std::env::var("PEC_E2E_HSM_TOKEN").expect("e2e/test.sh sets PEC_E2E_HSM_TOKEN");
    let pin =
        AuthPin::from(std::env::var("PEC_E2E_HSM_PIN").expect("e2e/test.sh sets PEC_E2E_HSM_PIN"));
    let mut attempt = 1;
    loop {
        match login(&label, &pin) {
            Ok(token) => return token,
            Err(e) if attempt < 40 => {
                eprintln!("log in to the test token, attempt {attempt}: {e}");
                if attempt % 4 == 0 {
                    reopen();
                }
                std::thread::sleep(std::time::Duration::from_millis(250));
                attempt += 1;
            }
            Err(e) => panic!("log in to the test token: {e}"),
        }
    }
}

#[test]
fn a_wrong_pin_is_refused_even_while_another_session_is_logged_in() {
    // PKCS#11 answers "already logged in" without checking the PIN while any
    // session of the process is logged in; the wrong PIN must still fail.
    // On the token kept for wrong PINs (a failed login rewrites its files).
    let label = std::env::var("PEC_E2E_HSM_TOKEN_WRONG_PIN")
        .expect("e2e/test.sh sets PEC_E2E_HSM_TOKEN_WRONG_PIN");
    let pin = std::env::var("PEC_E2E_HSM_PIN").expect("e2e/test.sh sets PEC_E2E_HSM_PIN");
    let held = login(&label, &AuthPin::from(pin)).expect("log in");
    let wrong = login(&label, &AuthPin::from("not-the-pin".to_string()));
    assert!(
        matches!(wrong, Err(pec_operator::hsm::HsmError::Login { .. })),
        "a wrong PIN logged in"
    );
    drop((held, token()));
}

#[test]
fn keys_are_generated_sensitive_non_extractable_and_never_twice() {
    let token = token();
    let id = key_id("uid-generated-once", 1);
    let first = token
        .ensure_key(&id, "test", Algorithm::EcdsaP256, false)
        .expect("generate");
    let again = token
        .ensure_key(&id, "test", Algorithm::EcdsaP256, false)
        .expect("find");
    assert_eq!(
        first, again,
        "a repeated call finds the key it already made"
    );
    assert_eq!(token.count_keys(&id).expect("count"), 1);
    let p = token.protection(first).expect("attributes");
    assert!(p.token && p.sensitive && p.always_sensitive, "{p:?}");
    assert!(!p.extractable && p.never_extractable, "{p:?}");
    token.destroy(&id).expect("destroy");
    token
        .destroy(&id)
        .expect("destroying what is gone succeeds");
    assert_eq!(token.count_keys(&id).expect("count"), 0);
}

#[test]
fn keys_for_wrapped_export_stay_sensitive() {
    let token = token();
    let id = key_id("uid-wrapped", 1);
    let key = token
        .ensure_key(&id, "test", Algorithm::EcdsaP256, true)
        .expect("generate");
    let p = token.protection(key).expect("attributes");
    assert!(
        p.extractable && p.sensitive,
        "extractable only under wrapping: {p:?}"
    );
    token.destroy(&id).expect("destroy");
}

/// `openssl dgst -sha256 -verify` of `dir/signature` over `dir/<file>` with
/// `dir/public.pem`: whether it verified, and what openssl said.
fn openssl_verify(dir: &std::path::Path, file: &str) -> (bool, String) {
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(dir.join("public.pem"))
        .arg("-signature")
        .arg(dir.join("signature"))
        .arg(dir.join(file))
        .output()
        .expect("run openssl");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn signatures_made_in_the_token_verify_with_openssl() {
    let token = token();
    let dir = std::env::temp_dir().join(format!("pec-hsm-sign-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let message = b"ricevuta di avvenuta consegna";
    std::fs::write(dir.join("message"), message).expect("write message");
    for (n, algorithm) in [Algorithm::EcdsaP256, Algorithm::Rsa3072, Algorithm::Rsa2048]
        .into_iter()
        .enumerate()
    {
        let id = key_id("uid-openssl", n as u32);
        let key = token
            .ensure_key(&id, "test", algorithm, false)
            .expect("generate");
        let signature = token.sign(key, algorithm, message).expect("sign");
        let public = token.public_key(&id).expect("public key");
        std::fs::write(dir.join("public.pem"), der::pem("PUBLIC KEY", &public)).expect("write key");
        std::fs::write(dir.join("signature"), &signature).expect("write signature");
        let (verified, said) = openssl_verify(&dir, "message");
        assert!(
            verified && said.contains("Verified OK"),
            "{algorithm:?}: {said}"
        );
        // A different message must not verify with the same signature.
        std::fs::write(dir.join("other"), b"altro messaggio").expect("write");
        assert!(
            !openssl_verify(&dir, "other").0,
            "{algorithm:?}: a tampered message verified"
        );
        token.destroy(&id).expect("destroy");
    }
}

#[test]
fn wrapped_export_needs_an_extractable_key_and_never_gives_plaintext() {
    let token = token();
    let wrapped_id = key_id("uid-export-wrapped", 1);
    let never_id = key_id("uid-export-never", 1);
    token
        .ensure_key(&wrapped_id, "test", Algorithm::EcdsaP256, true)
        .expect("generate");
    token
        .ensure_key(&never_id, "test", Algorithm::EcdsaP256, false)
        .expect("generate");
    for id in [&wrapped_id, &never_id] {
        assert!(
            !token.plaintext_readable(id).expect("read attempt"),
            "no plaintext value"
        );
    }
    // The documented action, as a person runs it.
    let dir = std::env::temp_dir().join(format!("pec-e2e-wrap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let run = |id: &[u8], out: &str| {
        Command::new(std::env::var("PEC_E2E_OPERATOR").expect("e2e/test.sh sets PEC_E2E_OPERATOR"))
            .args(["key", "export-wrapped", "--token"])
            .arg(std::env::var("PEC_E2E_HSM_TOKEN").expect("token"))
            .args(["--kek", "pec-e2e-kek", "--key-id"])
            .arg(pec_operator::signing::x509::hex(id))
            .arg("--out")
            .arg(dir.join(out))
            .env(
                "PEC_HSM_PIN",
                std::env::var("PEC_E2E_HSM_PIN").expect("pin"),
            )
            .output()
            .expect("run the operator binary")
    };
    let ok = run(&wrapped_id, "wrapped.bin");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // The blob is that key: unwrapped in the token under the same KEK, it
    // signs, and the original key's public half verifies the signature.
    let blob = std::fs::read(dir.join("wrapped.bin")).expect("wrapped key");
    let kek = token.ensure_kek("pec-e2e-kek").expect("the KEK");
    let restored = token
        .unwrap_for_signing(kek, &blob, Algorithm::EcdsaP256)
        .expect("the exported blob unwraps under the KEK");
    let message = b"chiave ripristinata";
    std::fs::write(dir.join("message"), message).expect("write message");
    let signature = token
        .sign(restored, Algorithm::EcdsaP256, message)
        .expect("the restored key signs");
    std::fs::write(dir.join("signature"), &signature).expect("write signature");
    let public = token.public_key(&wrapped_id).expect("public key");
    std::fs::write(dir.join("public.pem"), der::pem("PUBLIC KEY", &public)).expect("write key");
    let (verified, said) = openssl_verify(&dir, "message");
    assert!(verified, "the restored key is not the exported one: {said}");
    // The control: another key's public half does not verify it.
    let other = token.public_key(&never_id).expect("public key");
    std::fs::write(dir.join("public.pem"), der::pem("PUBLIC KEY", &other)).expect("write key");
    assert!(
        !openssl_verify(&dir, "message").0,
        "any key verifies: the check proves nothing"
    );
    // A damaged blob is refused by the token.
    let mut damaged = blob.clone();
    damaged[8] ^= 0xff;
    assert!(
        token
            .unwrap_for_signing(kek, &damaged, Algorithm::EcdsaP256)
            .is_err(),
        "a damaged blob unwrapped"
    );
    let refused = run(&never_id, "never.bin");
    assert!(
        !refused.status.success(),
        "a non-extractable key is not exported"
    );
    assert!(!dir.join("never.bin").exists());
    let _ = std::fs::remove_dir_all(&dir);
    token.destroy(&wrapped_id).expect("destroy");
    token.destroy(&never_id).expect("destroy");
}
