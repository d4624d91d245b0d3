//! HSM benchmark: signing throughput inside a PKCS#11 token (SoftHSM2) for
//! each algorithm, beside the same operation in process with the same key
//! type (ring), and key-generation time in the token.
//!
//! Needs a token: `./e2e/bench.sh` sets one up, or by hand:
//!     . e2e/lib/hsm.sh && init_hsm "$(mktemp -d)" && cargo bench --bench hsm

use std::{path::PathBuf, process::Command, time::Instant};

use cryptoki::types::AuthPin;
use pec_operator::hsm::{Algorithm, Hsm, key_id};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, RSA_PKCS1_SHA256, RsaKeyPair},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const MESSAGE: [u8; 1024] = [0x5a; 1024];

fn rsa_der(bits: u32) -> Result<Vec<u8>, BoxError> {
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            &format!("rsa_keygen_bits:{bits}"),
            "-outform",
            "DER",
        ])
        .output()?;
    if !out.status.success() {
        return Err("openssl genpkey failed".into());
    }
    Ok(out.stdout)
}

/// Signatures per second of `sign` over `n` runs.
fn rate(n: u32, mut sign: impl FnMut() -> Result<(), BoxError>) -> Result<f64, BoxError> {
    let start = Instant::now();
    for _ in 0..n {
        sign()?;
    }
    Ok(f64::from(n) / start.elapsed().as_secs_f64())
}

fn main() -> Result<(), BoxError> {
    let module = PathBuf::from(
        std::env::var("PEC_PKCS11_MODULE")
            .unwrap_or_else(|_| "/usr/lib/softhsm/libsofthsm2.so".into()),
    );
    let label = std::env::var("PEC_E2E_HSM_TOKEN")
        .map_err(|_| "set up a token first: . e2e/lib/hsm.sh && init_hsm DIR")?;
    let pin = AuthPin::from(std::env::var("PEC_E2E_HSM_PIN")?);
    let hsm = Hsm::open(&module)?;
    let token = hsm.login(&label, &pin)?;
    let rng = SystemRandom::new();
    println!(
        "{:<11} {:>12} {:>16} {:>16} {:>8}",
        "algorithm", "keygen (ms)", "HSM (signs/s)", "in-proc (signs/s)", "ratio"
    );
    for (algorithm, name, keygens, signs) in [
        (Algorithm::EcdsaP256, "ECDSA-P256", 20u32, 2000u32),
        (Algorithm::Rsa2048, "RSA-2048", 4, 500),
        (Algorithm::Rsa3072, "RSA-3072", 2, 200),
    ] {
        let start = Instant::now();
        let mut keys = Vec::new();
        for g in 0..keygens {
            let id = key_id(&format!("bench-{name}"), g);
            keys.push((
                id.clone(),
                token.ensure_key(&id, "bench", algorithm, false)?,
            ));
        }
        let keygen_ms = start.elapsed().as_secs_f64() * 1000.0 / f64::from(keygens);
        let key = keys[0].1;
        let in_hsm = rate(signs, || {
            token
                .sign(key, algorithm, &MESSAGE)
                .map(|_| ())
                .map_err(Into::into)
        })?;
        let in_process = match algorithm {
            Algorithm::EcdsaP256 => {
                let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
                    .map_err(|_| "ring keygen")?;
                let pair =
                    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
                        .map_err(|_| "ring key")?;
                rate(signs, || {
                    pair.sign(&rng, &MESSAGE)
                        .map(|_| ())
                        .map_err(|_| "ring sign".into())
                })?
            }
            Algorithm::Rsa2048 | Algorithm::Rsa3072 => {
                let bits = if algorithm == Algorithm::Rsa3072 {
                    3072
                } else {
                    2048
                };
                // openssl writes an RSAPrivateKey (PKCS#1) here.
                let pair = RsaKeyPair::from_der(&rsa_der(bits)?).map_err(|_| "ring key")?;
                let mut sig = vec![0u8; pair.public().modulus_len()];
                rate(signs, || {
                    pair.sign(&RSA_PKCS1_SHA256, &rng, &MESSAGE, &mut sig)
                        .map_err(|_| "ring sign".into())
                })?
            }
        };
        println!(
            "{name:<11} {keygen_ms:>12.1} {in_hsm:>16.0} {in_process:>16.0} {:>8.2}",
            in_process / in_hsm
        );
        for (id, _) in keys {
            token.destroy(&id)?;
        }
    }
    println!("ratio = in-process rate / HSM rate (how much slower signing in SoftHSM2 is)");
    Ok(())
}
