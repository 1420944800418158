//! The ACM refresher against a fake source: what it publishes, when, and what a failure does.

use std::sync::Mutex;

use serde_json::json;

use super::*;

#[derive(Default)]
struct Fake {
    /// Certificate ARN → (serial-ish chain text, or the error code of a failed export).
    certs: Mutex<BTreeMap<String, Result<String, String>>>,
    calls: Mutex<Vec<String>>,
}

impl Source for Fake {
    fn export<'a>(&'a self, arn: &'a str) -> BoxFuture<'a, Result<Exported, AcmError>> {
        Box::pin(async move {
            self.calls.lock().unwrap().push(arn.to_string());
            match self.certs.lock().unwrap().get(arn).cloned() {
                Some(Ok(chain)) => Ok(Exported {
                    chain,
                    key: Zeroizing::new("KEY".into()),
                }),
                other => Err(AcmError {
                    code: other
                        .and_then(Result::err)
                        .unwrap_or_else(|| "ResourceNotFoundException".into()),
                    message: "no".into(),
                }),
            }
        })
    }

    fn authority<'a>(&'a self, arn: &'a str) -> BoxFuture<'a, Result<String, AcmError>> {
        Box::pin(async move { Ok(format!("CA {arn}")) })
    }
}

const CERT: &str = "arn:aws:acm:us-west-2:111122223333:certificate/back";

fn state() -> Arc<State> {
    let l = json!({"portMapping": {"port": 8080, "protocol": "http"},
        "tls": {"mode": "STRICT", "certificate": {"acm": {"certificateArn": CERT}}}});
    Arc::new(trellis_model::testing::mesh_state(
        json!({}),
        &[("back", json!({"listeners": [l]}))],
        &[],
    ))
}

fn back() -> ProxyIdentity {
    ProxyIdentity::parse("mesh/m/virtualNode/back").unwrap()
}

#[tokio::test(start_paused = true)]
async fn exports_what_connected_proxies_name_refreshes_it_and_keeps_failures_closed() {
    let fake = Arc::new(Fake::default());
    fake.certs
        .lock()
        .unwrap()
        .insert(CERT.into(), Err("AccessDeniedException".into()));
    let (_state_tx, state_rx) = watch::channel(state());
    let (proxies_tx, proxies_rx) = watch::channel(BTreeSet::new());
    let (tx, mut rx) = watch::channel(Found::default());
    let cancel = CancellationToken::new();
    let refresh = Duration::from_secs(60);
    tokio::spawn(run(
        fake.clone(),
        state_rx,
        proxies_rx,
        Arc::new(tx),
        refresh,
        cancel.clone(),
    ));
    rx.changed().await.unwrap();
    let f = rx.borrow_and_update().clone();
    assert_eq!(
        f.endpoints.acm.as_deref(),
        Some(&BTreeSet::new()),
        "served, nothing held"
    );
    assert!(
        fake.calls.lock().unwrap().is_empty(),
        "no proxy needs it yet"
    );

    proxies_tx.send_replace([back()].into());
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(fake.calls.lock().unwrap().len(), 1);
    assert!(
        rx.borrow().secrets.is_empty(),
        "a failed export serves nothing"
    );

    // The retry (30 s, under the refresh) finds it exportable.
    fake.certs
        .lock()
        .unwrap()
        .insert(CERT.into(), Ok("v1".into()));
    tokio::time::sleep(Duration::from_secs(31)).await;
    let f = rx.borrow_and_update().clone();
    assert!(f.endpoints.acm.as_ref().unwrap().contains(CERT));
    let v1 = f.secrets[&format!("acm:{CERT}")].hash;

    // Renewed: the next refresh publishes the new content under a new version.
    fake.certs
        .lock()
        .unwrap()
        .insert(CERT.into(), Ok("v2".into()));
    tokio::time::sleep(refresh + Duration::from_secs(1)).await;
    let f = rx.borrow_and_update().clone();
    assert_ne!(f.secrets[&format!("acm:{CERT}")].hash, v1);

    // A later failure keeps the last good certificate in use.
    fake.certs
        .lock()
        .unwrap()
        .insert(CERT.into(), Err("ThrottlingException".into()));
    tokio::time::sleep(refresh + Duration::from_secs(1)).await;
    assert!(rx.borrow().secrets.contains_key(&format!("acm:{CERT}")));
    cancel.cancel();
}

/// `openssl` run in `dir`: its stdout.
fn openssl(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn an_exported_pbes2_key_decrypts_in_memory_with_its_passphrase_only() {
    let dir = std::env::temp_dir().join(format!("trellis-acm-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    openssl(
        &dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "k.pem",
        ],
    );
    let plain = openssl(&dir, &["pkcs8", "-topk8", "-nocrypt", "-in", "k.pem"]);
    // What ACM returns: PKCS#8 PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC); and the other PBES2
    // choices `openssl pkcs8` makes, should an export use one of them.
    let encrypt = |cipher: &str, prf: &str| {
        openssl(
            &dir,
            &[
                "pkcs8",
                "-topk8",
                "-v2",
                cipher,
                "-v2prf",
                prf,
                "-in",
                "k.pem",
                "-passout",
                "pass:0123abcd",
            ],
        )
    };
    let encrypted = encrypt("aes-256-cbc", "hmacWithSHA256");
    for (cipher, prf) in [
        ("aes-128-cbc", "hmacWithSHA1"),
        ("aes-256-cbc", "hmacWithSHA512"),
        ("des3", "hmacWithSHA1"),
    ] {
        let other = encrypt(cipher, prf);
        let key =
            sdk::decrypt(&other, "0123abcd").unwrap_or_else(|e| panic!("{cipher} with {prf}: {e}"));
        assert_eq!(key.as_str(), plain, "{cipher} with {prf}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(encrypted.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
    let key = sdk::decrypt(&encrypted, "0123abcd").unwrap();
    assert_eq!(key.as_str(), plain);
    let wrong = sdk::decrypt(&encrypted, "not-it").unwrap_err();
    assert_eq!(wrong.code, "UnusablePrivateKey");
    let body = plain.lines().nth(1).unwrap();
    assert!(
        !wrong.to_string().contains(body),
        "no key material in the error"
    );
    assert_eq!(
        sdk::decrypt(&plain, "x").unwrap_err().code,
        "UnusablePrivateKey"
    );
}
