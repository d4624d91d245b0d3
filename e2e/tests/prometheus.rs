//! The shipped Prometheus rules and dashboard, checked by the real
//! Prometheus tools: promtool checks and unit-tests the rules and every
//! dashboard query, and a real Prometheus scrapes the operator, evaluates the
//! rules and fires an alert for a domain with a tiny budget.

use std::{path::PathBuf, process::Command};

use kube::Api;
use pec_operator::api::{FailoverMode, MailDomain};
use serde_json::{Value, json};

use crate::{
    datacenter::free_port,
    failover::{World, fast_health, world},
    harness::{eventually, has_condition, wait_for},
    sla::{measure, set_down},
};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A Prometheus tool built by e2e/lib/tools.sh at the version
/// e2e/versions.env pins (e2e/test.sh exports its path).
fn tool(name: &str) -> String {
    let var = format!("PEC_E2E_{}", name.to_ascii_uppercase());
    std::env::var(&var).unwrap_or_else(|_| panic!("e2e/test.sh sets {var}"))
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new(tool("promtool"))
        .args(args)
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn shipped_rules_pass_promtool_check_and_unit_tests() {
    for (file, count) in [
        ("sla-rules", 13),
        ("operational-rules", pec_operator::alerts::names().len()),
    ] {
        let rules = repo(&format!("charts/pec-operator/files/{file}.yaml"));
        let checked = promtool(&["check", "rules", rules.to_str().expect("utf-8 path")]);
        assert!(
            checked.contains(&format!("SUCCESS: {count} rules found")),
            "{checked}"
        );
        let tests = repo(&format!("e2e/prometheus/{file}.test.yaml"));
        let tested = promtool(&["test", "rules", tests.to_str().expect("utf-8 path")]);
        assert!(tested.contains("SUCCESS"), "{tested}");
    }
    // Every operational alert has a promtool case.
    let cases = std::fs::read_to_string(repo("e2e/prometheus/operational-rules.test.yaml"))
        .expect("operational-rules.test.yaml");
    for name in pec_operator::alerts::names() {
        assert!(
            cases.contains(&format!("alertname: {name}")),
            "no promtool case for {name}"
        );
    }
}

/// A real Prometheus, scraping both operator replicas the way the chart's
/// ServiceMonitor does (the target carries the operator's namespace as
/// `namespace`, which the Prometheus Operator adds from the Service, and the
/// metrics' own labels win: honorLabels), evaluating the shipped rules.
/// Killed when dropped.
pub struct RealPrometheus {
    process: tokio::process::Child,
    /// Its HTTP port on 127.0.0.1.
    pub port: String,
}

impl RealPrometheus {
    /// Starts one for the test `test`, loading the shipped rules files.
    pub async fn start(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("pec-prometheus-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let targets: Vec<String> = std::env::var("PEC_E2E_METRICS_PORTS")
            .expect("e2e/test.sh sets PEC_E2E_METRICS_PORTS")
            .split(',')
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let config = json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [
                repo("charts/pec-operator/files/sla-rules.yaml"),
                repo("charts/pec-operator/files/operational-rules.yaml"),
            ],
            "scrape_configs": [{
                "job_name": "pec-operator",
                "honor_labels": true,
                "static_configs": [{
                    "targets": targets,
                    "labels": {"namespace": "pec-system", "service": "pec-operator"},
                }],
            }],
        });
        std::fs::write(
            dir.join("prometheus.yml"),
            serde_yaml::to_string(&config).expect("yaml"),
        )
        .expect("config");
        let port = free_port();
        let process = tokio::process::Command::new(tool("prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus runs");
        let prometheus = Self {
            process,
            port: port.to_string(),
        };
        // Prometheus 3 takes the scrape: it refuses one without a Content-Type.
        eventually("both operator targets up in Prometheus", || async {
            let targets = prometheus.api("/api/v1/targets").await?;
            let active = targets["data"]["activeTargets"].as_array()?;
            (active.len() == 2 && active.iter().all(|t| t["health"] == "up")).then_some(())
        })
        .await;
        prometheus
    }

    /// The JSON answer of an API path; `None` while Prometheus is not
    /// listening yet or answers something else.
    pub async fn api(&self, path: &str) -> Option<Value> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(format!("127.0.0.1:{}", self.port))
            .await
            .ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        serde_json::from_str(response.split("\r\n\r\n").nth(1)?).ok()
    }

    /// The first alert named `name` whose labels include `labels`, once it
    /// is in one of `states` (`pending`, `firing`).
    pub async fn alert(&self, name: &str, labels: &[(&str, &str)], states: &[&str]) -> Value {
        eventually(&format!("{name} {states:?} in Prometheus"), || async {
            let alerts = self.api("/api/v1/alerts").await?;
            alerts["data"]["alerts"]
                .as_array()?
                .iter()
                .find(|a| {
                    a["labels"]["alertname"] == name
                        && labels.iter().all(|(k, v)| a["labels"][*k] == *v)
                        && states.iter().any(|s| a["state"] == *s)
                })
                .cloned()
        })
        .await
    }

    /// Stops it.
    pub async fn stop(mut self) {
        let _ = self.process.kill().await;
    }
}

fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| exprs(i, out)),
        _ => {}
    }
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    let text = std::fs::read_to_string(repo("charts/pec-operator/files/dashboard.json"))
        .expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut found = Vec::new();
    exprs(&dashboard, &mut found);
    assert!(found.len() >= 10, "only {} queries", found.len());
    // Grafana variables are replaced by what they stand for before checking.
    let rules = json!({"groups": [{"name": "dashboard", "rules": found.iter().enumerate().map(|(i, e)| json!({
        "record": format!("dashboard:query_{i}"),
        "expr": e.replace("$namespace", ".*"),
    })).collect::<Vec<_>>()}]});
    let path = std::env::temp_dir().join(format!("pec-dashboard-{}.yaml", std::process::id()));
    std::fs::write(&path, serde_yaml::to_string(&rules).expect("yaml")).expect("write");
    let checked = promtool(&["check", "rules", path.to_str().expect("utf-8 path")]);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", found.len())),
        "{checked}"
    );
}

#[tokio::test]
async fn a_real_prometheus_fires_the_budget_alert_for_a_tiny_budget() {
    let World {
        client,
        ns,
        sites,
        md,
    } = world(
        "prometheus-alert",
        "pa",
        fast_health(),
        FailoverMode::ActiveActive,
        1,
    )
    .await;
    // 99.99999% of four months leaves about a second of budget.
    measure(&client, &ns, &md, json!({"objective": 99.99999})).await;

    let prometheus = RealPrometheus::start("budget").await;

    set_down(&client, &sites, true).await;
    let mds = Api::<MailDomain>::namespaced(client.clone(), &ns);
    wait_for(
        &mds,
        &md,
        "NoHealthySite",
        has_condition("NoHealthySite", "True", None),
    )
    .await;
    let firing = prometheus
        .alert(
            "PecSlaBudgetExhausted",
            &[("namespace", ns.as_str())],
            &["firing"],
        )
        .await;
    assert_eq!(firing["labels"]["severity"], "critical");
    let summary = firing["annotations"]["summary"]
        .as_str()
        .unwrap_or_default();
    assert!(summary.contains(&format!("SlaTarget {ns}/")), "{summary}");
    set_down(&client, &sites, false).await;
    prometheus.stop().await;
    sites.remove().await;
}
