//! The shipped monitoring (deploy/monitoring: alerting rules, their promtool tests, the
//! Grafana dashboard) refers only to series the sidecar really exports: a real sidecar is
//! scraped after serving a token, and every metric name, label name and label value the
//! files use must be in that scrape.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::*;
use serde_json::json;

/// Series Prometheus makes itself, not the sidecar: scrape health, and the target labels.
const PROMETHEUS_OWN: &[&str] = &["up"];
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// name -> label name -> values seen, from the text exposition format.
type Scrape = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn parse_scrape(text: &str) -> Scrape {
    let mut out = Scrape::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..end].to_owned()).or_default();
        if let Some(body) = line[end..]
            .strip_prefix('{')
            .and_then(|r| r.split_once('}'))
            .map(|(b, _)| b)
        {
            for m in matchers(body) {
                labels.entry(m.label).or_default().insert(m.value);
            }
        }
    }
    out
}

/// One label matcher of a selector (or one label of a scraped sample).
#[derive(Debug, PartialEq)]
struct Matcher {
    label: String,
    value: String,
    /// `=`, as opposed to `!=`, `=~`, `!~`.
    exact: bool,
}

/// A series name and its matchers.
type Selector = (String, Vec<Matcher>);

/// `a="x",b!="y"` (values have no commas here; JSON-escaped quotes are unescaped).
fn matchers(body: &str) -> Vec<Matcher> {
    body.split(',')
        .filter_map(|m| {
            let m = m.trim().replace("\\\"", "\"");
            let at = m.find(['=', '!'])?;
            let op = &m[at..];
            let label = m[..at].trim().to_owned();
            (!label.is_empty()).then(|| Matcher {
                label,
                value: op
                    .trim_start_matches(['=', '!', '~'])
                    .trim_matches('"')
                    .to_owned(),
                exact: op.starts_with('=') && !op.starts_with("=~"),
            })
        })
        .collect()
}

/// Every `name{matchers}` / `name[range]` / bare `name` of the metric family in a text.
fn selectors(text: &str) -> Vec<Selector> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("ee_auth_").map(|a| a + i) {
        let start_ok = at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        let end = text[at..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |e| e + at);
        if start_ok {
            let labels = text[end..]
                .strip_prefix('{')
                .and_then(|r| r.split_once('}'))
                .map_or_else(Vec::new, |(body, _)| matchers(body));
            out.push((text[at..end].to_owned(), labels));
        }
        i = end;
    }
    out
}

/// Identifiers used as a series (followed by `{` or `[`) that are not ours: must be none
/// but Prometheus' own.
fn foreign_series(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            continue;
        }
        if (c == '{' || c == '[')
            && !word.is_empty()
            && !word.starts_with("ee_auth_")
            && !PROMETHEUS_OWN.contains(&word.as_str())
        {
            out.push(word.clone());
        }
        word.clear();
    }
    out
}

/// The PromQL expressions of the rules file and the dashboard (the test file's input
/// series are checked by name and labels through [`selectors`] on its whole text).
fn expressions(rules: &str, dashboard: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    // `expr:` values, one line or a `|` block indented below it.
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let mut expr = rest.trim().trim_start_matches('|').trim().to_owned();
        while let Some(next) = lines.peek() {
            if next.trim().is_empty() || next.len() - next.trim_start().len() <= indent {
                break;
            }
            expr.push(' ');
            expr.push_str(next.trim());
            lines.next();
        }
        out.push(expr);
    }
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.extend(target["expr"].as_str().map(str::to_owned));
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        out.extend(var["definition"].as_str().map(str::to_owned));
    }
    out
}

#[tokio::test]
async fn dashboard_and_alert_rules_use_only_exported_series() {
    // A sidecar whose provider has answered ok, transiently and permanently: the
    // per-provider series exist only once each outcome has happened.
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &json!({
            "providers": { "idp": oauth2_provider(&idp) },
            "accounts": {
                "alice": { "user": "alice@example.com", "provider": "idp", "refreshToken": "rt-alice" },
                "bob": { "user": "bob@example.com", "provider": "idp", "refreshToken": "rt-bob" },
                "carol": { "user": "carol@example.com", "provider": "idp", "refreshToken": "rt-carol" },
                "fixed": { "user": "f@example.com", "pass": "p" }
            }
        }),
    );
    let mut options = test_options(&config);
    options.policy.request_wait = std::time::Duration::from_millis(500);
    let running = start(options).await.unwrap();
    let addr = running.local_addr;
    let c = client();
    // A miss, then a hit.
    for _ in 0..2 {
        let a = ask(&c, addr, "account=alice&proto=imap", None).await;
        assert_eq!(a.status, 200);
    }
    idp.set_fault(Fault::status(503, None));
    assert_eq!(ask(&c, addr, "account=bob", None).await.status, 429);
    idp.set_fault(Fault::invalid_grant(None));
    assert_eq!(ask(&c, addr, "account=carol", None).await.status, 403);
    let text = scrape(&c, addr).await;
    running.shutdown().await;
    let scrape = parse_scrape(&text);
    assert!(scrape.contains_key("ee_auth_refreshes_total"), "{text}");

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/monitoring");
    let read = |name: &str| std::fs::read_to_string(root.join(name)).unwrap();
    let rules = read("rules.yml");
    let dashboard_text = read("dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard_text).unwrap();

    let mut problems = Vec::new();
    for expr in expressions(&rules, &dashboard) {
        for name in foreign_series(&expr) {
            problems.push(format!(
                "`{name}` is not a series the sidecar exports: {expr}"
            ));
        }
    }
    let mut checked = BTreeSet::new();
    for file in [
        "rules.yml",
        "prometheusrule.yaml",
        "rules.test.yml",
        "dashboard.json",
    ] {
        for (name, labels) in selectors(&read(file)) {
            let Some(exported) = scrape.get(&name) else {
                problems.push(format!("{file}: `{name}` is not in the scrape"));
                continue;
            };
            checked.insert(name.clone());
            for Matcher {
                label,
                value,
                exact,
            } in labels
            {
                if TARGET_LABELS.contains(&label.as_str()) {
                    continue;
                }
                match exported.get(&label) {
                    None => problems.push(format!("{file}: `{name}` has no label `{label}`")),
                    // Provider names are the config's; only fixed vocabularies are compared.
                    Some(values) if exact && label != "provider" && !values.contains(&value) => {
                        problems.push(format!(
                            "{file}: `{name}{{{label}=\"{value}\"}}`: the sidecar exports {values:?}"
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The files cover what an operator must watch (a rename in metrics.rs shows up here).
    for must in [
        "ee_auth_requests_total",
        "ee_auth_request_duration_seconds_bucket",
        "ee_auth_cache_events_total",
        "ee_auth_refreshes_total",
        "ee_auth_upstream_duration_seconds_bucket",
        "ee_auth_accounts",
        "ee_auth_token_min_remaining_seconds",
        "ee_auth_config_reloads_total",
        "ee_auth_state_persist_failures_total",
    ] {
        assert!(
            checked.contains(must),
            "nothing in deploy/monitoring uses {must}"
        );
    }
}

#[test]
fn the_selector_parser_sees_names_labels_and_foreign_series() {
    let s = selectors(
        r#"sum(rate(ee_auth_requests_total{outcome="hit",proto!="none"}[5m])) / ee_auth_accounts"#,
    );
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].0, "ee_auth_requests_total");
    let m = |label: &str, value: &str, exact| Matcher {
        label: label.into(),
        value: value.into(),
        exact,
    };
    assert_eq!(
        s[0].1,
        vec![m("outcome", "hit", true), m("proto", "none", false)]
    );
    assert_eq!(s[1], ("ee_auth_accounts".to_owned(), vec![]));
    assert_eq!(
        foreign_series(r#"rate(node_cpu_seconds_total{mode="idle"}[5m]) + up{job="x"}"#),
        vec!["node_cpu_seconds_total".to_owned()]
    );
    let scrape = parse_scrape("# HELP x\nee_auth_accounts{state=\"ok\"} 1\nee_auth_x 2\n");
    assert!(scrape["ee_auth_accounts"]["state"].contains("ok"));
    assert!(scrape.contains_key("ee_auth_x"));
}
