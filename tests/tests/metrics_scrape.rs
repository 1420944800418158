//! Prometheus scrapes a secured agent's `/metrics`: Prometheus cannot sign SigV4, so the auth
//! file names scrapers by the SHA-256 of a bearer token. Real Prometheus (apt) scrapes over
//! HTTPS with its `credentials_file`; a wrong token is refused and audited; the token opens
//! nothing but `GET /metrics`, never travels in the clear off the host, and never reaches a log.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use trellis_tests::auth::{ApiAuth, AuthFile, Key, Pki, Tls, admin_policy};
use trellis_tests::mesh::{Agent, AgentOpts};
use trellis_tests::{Proc, Workdir, bin, eventually, run};

/// A random token in a file of its own, as an operator makes one (`openssl rand -hex 32`).
fn token_file(work: &Workdir, name: &str) -> (PathBuf, String) {
    let out = run(Command::new("openssl").args(["rand", "-hex", "32"]));
    assert!(out.status.success());
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let path = work.join(&format!("{name}.token"));
    std::fs::write(&path, &token).expect("write the token");
    (path, token)
}

/// An agent with its API over HTTPS and an auth file naming the scraper "prometheus": the agent,
/// the CA its certificate chains to, the token file and the token.
fn https_agent_with_a_scraper(work: &Workdir) -> (Agent, Pki, PathBuf, String) {
    let pki = Pki::new(work, "api");
    let (cert, key) = pki.issue("api");
    let (file, token) = token_file(work, "prometheus");
    let mut auth = ApiAuth::admin(
        work,
        "agent",
        AuthFile::default().scraper("prometheus", &file),
    );
    auth.tls = Some(Tls {
        cert,
        key,
        ca: pki.ca.clone(),
    });
    let agent = Agent::start_with(
        work,
        &AgentOpts {
            auth: Some(auth),
            ..AgentOpts::default()
        },
    );
    (agent, pki, file, token)
}

/// `curl -s` of `url` with `Authorization: Bearer TOKEN`: (status, body).
fn bearer_curl(url: &str, token: &str, ca: &Path, extra: &[&str]) -> (String, String) {
    let out = run(Command::new("curl")
        .args(["-s", "-m", "5", "-w", "\n%{http_code}", "--cacert"])
        .arg(ca)
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(extra)
        .arg(url));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.to_string(), body.to_string())
}

/// One value of a Prometheus instant query: the sample of the series whose `job` is `job`.
fn query(prom: u16, q: &str, job: &str) -> Option<f64> {
    let out = run(Command::new("curl").args([
        "-s",
        "-m",
        "5",
        "--get",
        "--data-urlencode",
        &format!("query={q}"),
        &format!("http://127.0.0.1:{prom}/api/v1/query"),
    ]));
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["data"]["result"]
        .as_array()?
        .iter()
        .find(|r| r["metric"]["job"] == job)
        .and_then(|r| r["value"][1].as_str()?.parse().ok())
}

#[test]
fn prometheus_scrapes_with_its_bearer_token_and_a_wrong_token_is_refused_and_audited() {
    if !Path::new("/usr/bin/prometheus").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the scrape test needs prometheus (scripts/setup.sh installs it in CI)"
        );
        eprintln!("SKIPPED the Prometheus scrape: no prometheus (apt-get install prometheus)");
        return;
    }
    let work = Workdir::new("scrape");
    let (agent, pki, good, token) = https_agent_with_a_scraper(&work);
    let (wrong, wrong_token) = token_file(&work, "intruder");
    agent.appmesh(&["create-mesh", "--mesh-name", "shop"]);
    let target = agent
        .api
        .strip_prefix("https://")
        .expect("an HTTPS API")
        .to_string();

    let job = |name: &str, token: &Path| {
        format!(
            "  - job_name: {name}\n    scheme: https\n    static_configs: [{{targets: ['{target}']}}]\n    tls_config: {{ca_file: '{}'}}\n    authorization: {{type: Bearer, credentials_file: '{}'}}\n",
            pki.ca.display(),
            token.display()
        )
    };
    let config = work.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s}}\nscrape_configs:\n{}{}",
            job("trellis", &good),
            job("intruder", &wrong)
        ),
    )
    .expect("write prometheus.yml");
    let mut prometheus = Proc::spawn(
        "prometheus",
        Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                work.join("prometheus-data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0"),
        work.join("prometheus.log"),
    );
    let prom: u16 = prometheus
        .wait_for_log(
            "msg=\"Listening on\" address=127.0.0.1:",
            Duration::from_secs(60),
        )
        .parse()
        .expect("Prometheus's port");

    // The agent's own series arrive through Prometheus: the scrape was parsed, not only answered.
    eventually(
        "Prometheus holds the agent's metrics",
        Duration::from_secs(60),
        || {
            let up = query(prom, "up", "trellis");
            let meshes = query(prom, "trellis_api_auth_reloads_total", "trellis");
            (up == Some(1.0) && meshes.is_some())
                .then_some(())
                .ok_or(format!(
                    "up={up:?} trellis_api_auth_reloads_total={meshes:?}"
                ))
        },
    );
    eventually(
        "the wrong token's scrapes fail",
        Duration::from_secs(30),
        || {
            let up = query(prom, "up", "intruder");
            (up == Some(0.0)).then_some(()).ok_or(format!("up={up:?}"))
        },
    );
    // Prometheus says why: the agent's 403.
    let targets =
        run(Command::new("curl").args(["-s", &format!("http://127.0.0.1:{prom}/api/v1/targets")]));
    let targets: Value = serde_json::from_slice(&targets.stdout).expect("targets JSON");
    let intruder = targets["data"]["activeTargets"]
        .as_array()
        .expect("targets")
        .iter()
        .find(|t| t["labels"]["job"] == "intruder")
        .expect("the intruder job");
    assert!(
        intruder["lastError"].as_str().unwrap_or("").contains("403"),
        "{intruder}"
    );

    // Refusals are audited as an unrecognised client; the scraper's reads are not.
    let audit = agent.auth.as_ref().expect("secured").audit_lines();
    assert!(
        audit.iter().any(|l| l["operation"] == "ReadMetrics"
            && l["outcome"] == "unauthenticated"
            && l["errorCode"] == "UnrecognizedClientException"),
        "{audit:?}"
    );
    // No token reaches the agent's log or the audit log.
    let log = agent.proc.log_text();
    let audit_text = audit
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    for t in [&token, &wrong_token] {
        assert!(!log.contains(t.as_str()), "a token in the agent's log");
        assert!(!audit_text.contains(t.as_str()), "a token in the audit log");
    }
    drop(prometheus);
}

#[test]
fn a_bearer_token_opens_nothing_but_get_metrics_and_never_in_the_clear_off_the_host() {
    let work = Workdir::new("scrape-scope");
    let (agent, pki, good, token) = https_agent_with_a_scraper(&work);
    let api = &agent.api;
    let (status, body) = bearer_curl(&format!("{api}/metrics"), &token, &pki.ca, &[]);
    assert_eq!(status, "200", "{body}");
    assert!(body.contains("trellis_api_auth_reloads_total"), "{body}");
    for (path, extra) in [
        ("/v20190125/meshes", &[][..]),
        ("/trellis/v1/load", &[][..]),
        ("/debug/xds", &[][..]),
        ("/metrics", &["-X", "POST"][..]),
    ] {
        let (status, body) = bearer_curl(&format!("{api}{path}"), &token, &pki.ca, extra);
        assert_eq!(status, "403", "{path} {extra:?}: {body}");
        assert!(
            body.contains("AccessDeniedException")
                && body.contains("a bearer token is accepted only for GET /metrics"),
            "{path}: {body}"
        );
    }
    // An unknown token is an unrecognised client.
    let (status, body) = bearer_curl(&format!("{api}/metrics"), "not-the-token", &pki.ca, &[]);
    assert_eq!(status, "403", "{body}");
    assert!(body.contains("UnrecognizedClientException"), "{body}");

    // An API beyond loopback without TLS: the token is refused from off the host (here the
    // host's own non-loopback address, which is the peer address the agent sees).
    let auth_file = work.join("plain-auth.json");
    AuthFile::default()
        .key(&Key::new("admin"), admin_policy())
        .scraper("prometheus", &good)
        .write(&auth_file);
    let mut plain = Proc::spawn(
        "plain",
        Command::new(bin("trellis-agent"))
            .arg("serve")
            .arg("--data-dir")
            .arg(work.join("plain-data"))
            .args(["--api-addr", "0.0.0.0:0", "--api-auth"])
            .arg(&auth_file)
            .arg("--xds-socket")
            .arg(work.join("plain.sock")),
        work.join("plain.log"),
    );
    let port: u16 = plain
        .wait_for_log(" api=0.0.0.0:", Duration::from_secs(30))
        .parse()
        .expect("a port");
    let host = host_address();
    let (status, body) = bearer_curl(
        &format!("http://{host}:{port}/metrics"),
        &token,
        &pki.ca,
        &[],
    );
    assert_eq!(status, "403", "{body}");
    assert!(
        body.contains("accepted only over TLS or from loopback"),
        "{body}"
    );
    // From loopback the same plaintext request is served: the token never left the host.
    let (status, body) = bearer_curl(
        &format!("http://127.0.0.1:{port}/metrics"),
        &token,
        &pki.ca,
        &[],
    );
    assert_eq!(status, "200", "{body}");
    assert!(!plain.log_text().contains(&token), "the token in a log");
    assert!(
        !agent.proc.log_text().contains(&token),
        "the token in a log"
    );
}

/// An address of this host that is not loopback (the source the kernel picks for it too).
fn host_address() -> String {
    let out = run(Command::new("ip").args(["-4", "-o", "addr", "show", "scope", "global"]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let cidr = l.split_whitespace().skip_while(|w| *w != "inet").nth(1)?;
            Some(cidr.split('/').next()?.to_string())
        })
        .expect("a non-loopback IPv4 address")
}
