//! examples/monitoring/ checked against a real heapcapd: the Prometheus alert rules parse
//! (`promtool check rules`) and their unit tests pass (`promtool test rules`), and every metric
//! name and label the rules and the Grafana dashboard use is one that a running heapcapd serves,
//! scraped while it supervises a real runc container (with both quotas, after a denial).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use heapcap_integration::daemon::Daemon;
use heapcap_integration::fixture::{assert_at_quota, fixture_result, MIB};
use heapcap_integration::ids::unique_id;
use heapcap_integration::process::{run_captured, show};
use heapcap_integration::runtime::Runtime;
use serde_json::Value;

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").join("examples/monitoring")
}

/// `promtool ARGS` (installed by `scripts/setup.sh --ci`); panics if it is missing.
fn promtool(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("promtool");
    cmd.args(args).current_dir(monitoring());
    match cmd.output() {
        Ok(_) => run_captured(cmd, Duration::from_secs(60)),
        Err(e) => panic!("promtool is needed to check examples/monitoring ({e}): run `scripts/setup.sh --ci` as root"),
    }
}

#[test]
fn the_alert_rules_parse_and_their_unit_tests_pass() {
    let out = promtool(&["check", "rules", "alerts.yml"]);
    assert!(out.status.success(), "promtool check rules: {}", show(&out));
    let out = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(out.status.success(), "promtool test rules: {}", show(&out));
}

/// A real heapcapd's exposition, scraped while a runc container with a process quota and a total
/// runs, after another container was denied at its quota.
fn real_scrape() -> String {
    let d = Daemon::start();
    let b = d.bundle(&[("heapcap.io/limit", "16Mi")], &["/alloc", "mmap", "1048576", "67108864"]);
    let (allocated, result) = fixture_result(&b.run(Runtime::Runc, &unique_id("denied")));
    assert_at_quota("the denied container", allocated, &result, 16 * MIB, MIB);
    let mut b = d.bundle(
        &[("heapcap.io/limit", "64Mi"), ("heapcap.io/total-limit", "128Mi")],
        &["/bin/sh", "-c", "/alloc mmap 1048576 8388608; echo ready; sleep 120"],
    );
    b.readonly_root(true);
    let c = b.create(Runtime::Runc, &unique_id("scraped"));
    c.start();
    c.wait_for_stdout("ready", Duration::from_secs(60));
    let text = d.metrics();
    assert!(text.contains(&format!("container=\"{}\"", c.id())), "the running container is not in /metrics:\n{text}");
    // Each process is named in its peak (commands are read for the scrape when not read yet).
    let peaks: Vec<&str> = text.lines().filter(|l| l.starts_with("heapcap_process_peak_heap_bytes{")).collect();
    assert!(!peaks.is_empty() && peaks.iter().all(|l| !l.contains("command=\"\"")), "{text}");
    text
}

/// What a PromQL expression uses: metric names and label names.
#[derive(Debug, Default)]
struct Used {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
}

const KEYWORDS: [&str; 7] = ["and", "or", "unless", "bool", "offset", "inf", "nan"];
/// Aggregations, which may take `by (...)` before their argument.
const AGGREGATIONS: [&str; 12] =
    ["sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group"];
const LABEL_LISTS: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The metric and label names in `expr` (strings, range durations, numbers, functions, keywords and
/// Grafana variables left out).
fn promql(expr: &str, used: &mut Used) {
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let ident_at = |i: &mut usize| -> String {
        let start = *i;
        while *i < chars.len() && is_ident(chars[*i]) {
            *i += 1;
        }
        chars[start..*i].iter().collect()
    };
    let next_non_space = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        chars.get(i).copied()
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '[' => {
                while i < chars.len() && chars[i] != ']' {
                    i += 1;
                }
                i += 1;
            }
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    while i < chars.len() && chars[i] != '}' {
                        i += 1;
                    }
                    i += 1;
                } else {
                    ident_at(&mut i);
                }
            }
            '{' => {
                // A selector: `name op "value", ...`.
                i += 1;
                while i < chars.len() && chars[i] != '}' {
                    if chars[i] == '"' {
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            i += if chars[i] == '\\' { 2 } else { 1 };
                        }
                        i += 1;
                    } else if is_ident_start(chars[i]) {
                        let name = ident_at(&mut i);
                        used.labels.insert(name);
                    } else {
                        i += 1;
                    }
                }
                i += 1;
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if is_ident_start(c) => {
                let name = ident_at(&mut i);
                let called = next_non_space(i) == Some('(');
                if LABEL_LISTS.contains(&name.as_str()) {
                    if called {
                        while i < chars.len() && chars[i] != '(' {
                            i += 1;
                        }
                        while i < chars.len() && chars[i] != ')' {
                            if is_ident_start(chars[i]) {
                                let label = ident_at(&mut i);
                                used.labels.insert(label);
                            } else {
                                i += 1;
                            }
                        }
                    }
                } else if !called
                    && !KEYWORDS.contains(&name.to_ascii_lowercase().as_str())
                    && !AGGREGATIONS.contains(&name.as_str())
                {
                    used.metrics.insert(name);
                }
            }
            _ => i += 1,
        }
    }
}

/// Label names referred to in templates: `$labels.NAME` (rules), `{{NAME}}` (legends).
fn template_labels(text: &str, used: &mut Used) {
    for (i, _) in text.match_indices("$labels.") {
        let name: String = text[i + "$labels.".len()..].chars().take_while(|c| is_ident(*c)).collect();
        used.labels.insert(name);
    }
    for part in text.split("{{").skip(1) {
        let inner = part.split("}}").next().unwrap_or("").trim();
        if !inner.is_empty() && inner.chars().all(is_ident) {
            used.labels.insert(inner.to_string());
        }
    }
}

/// What alerts.yml uses: each rule's expression and the labels its annotations name.
fn used_by_rules() -> Used {
    let text = std::fs::read_to_string(monitoring().join("alerts.yml")).expect("read alerts.yml");
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).expect("alerts.yml is YAML");
    let mut used = Used::default();
    let mut rules = 0;
    for group in docs[0]["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            promql(rule["expr"].as_str().expect("expr"), &mut used);
            for (_, value) in rule["annotations"].as_hash().expect("annotations") {
                template_labels(value.as_str().expect("annotation text"), &mut used);
            }
            rules += 1;
        }
    }
    assert_eq!(rules, 5, "alerts.yml: denials rising, heapcapd down, no fd holder, latency high, near a total");
    used
}

/// What the Grafana dashboard uses: each target's expression and legend, and the variables' queries.
fn used_by_dashboard() -> Used {
    let text = std::fs::read_to_string(monitoring().join("grafana-dashboard.json")).expect("read the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut used = Used::default();
    let panels = dashboard["panels"].as_array().expect("panels");
    for target in panels.iter().flat_map(|p| p["targets"].as_array().expect("targets")) {
        promql(target["expr"].as_str().expect("expr"), &mut used);
        if let Some(legend) = target["legendFormat"].as_str() {
            template_labels(legend, &mut used);
        }
    }
    for var in dashboard["templating"]["list"].as_array().expect("variables") {
        let query = var["query"].as_str().unwrap_or("");
        if let Some(args) = query.strip_prefix("label_values(").and_then(|q| q.strip_suffix(')')) {
            let (metric, label) = args.split_once(',').expect("label_values(METRIC, LABEL)");
            used.metrics.insert(metric.trim().to_string());
            used.labels.insert(label.trim().to_string());
        }
    }
    assert!(panels.len() >= 10, "the dashboard has {} panels", panels.len());
    used
}

/// The sample names and label names of an exposition.
fn served(scrape: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let body = scrape.split_once("\r\n\r\n").map_or(scrape, |(_, b)| b);
    let (mut metrics, mut labels) = (BTreeSet::new(), BTreeSet::new());
    for line in body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let name: String = line.chars().take_while(|c| is_ident(*c)).collect();
        if let Some(set) = line[name.len()..].strip_prefix('{').and_then(|r| r.split_once('}')).map(|(s, _)| s) {
            let mut used = Used::default();
            promql(&format!("{{{set}}}"), &mut used);
            labels.extend(used.labels);
        }
        metrics.insert(name);
    }
    (metrics, labels)
}

#[test]
fn the_rules_and_dashboard_use_only_what_heapcapd_serves() {
    let (metrics, labels) = served(&real_scrape());
    // Prometheus's own: `up` for every target, and the target labels it adds to every series.
    let prometheus_metrics = ["up"];
    let target_labels = ["job", "instance"];
    for (what, used) in [("alerts.yml", used_by_rules()), ("grafana-dashboard.json", used_by_dashboard())] {
        assert!(used.metrics.iter().any(|m| m.starts_with("heapcap_")), "{what}: no metric found in {used:?}");
        for metric in &used.metrics {
            assert!(
                metrics.contains(metric) || prometheus_metrics.contains(&metric.as_str()),
                "{what} uses {metric}, which heapcapd does not serve; it serves {metrics:?}"
            );
        }
        for label in &used.labels {
            assert!(
                labels.contains(label) || target_labels.contains(&label.as_str()),
                "{what} uses the label {label}, which heapcapd does not serve; it serves {labels:?}"
            );
        }
    }
    // Every figure an operator needs is served (and used by the dashboard).
    let dashboard = used_by_dashboard();
    for needed in [
        "heapcap_holder_connected",
        "heapcap_container_process_limit_bytes",
        "heapcap_container_total_limit_bytes",
        "heapcap_process_peak_heap_bytes",
        "heapcap_container_heap_bytes",
        "heapcap_denials_total",
        "heapcap_decision_latency_seconds_bucket",
    ] {
        assert!(metrics.contains(needed), "heapcapd does not serve {needed}: {metrics:?}");
        assert!(dashboard.metrics.contains(needed), "the dashboard does not show {needed}");
    }
}

#[test]
fn the_promql_reader_finds_names_and_labels() {
    let mut used = Used::default();
    promql(
        r#"histogram_quantile(0.99, sum by (instance, le) (rate(a_b_bucket{x="1}", y=~"$v"}[$__rate_interval]))) > 0.005 and on(z) c offset 5m"#,
        &mut used,
    );
    let names = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>();
    assert_eq!(names(&used.metrics), ["a_b_bucket", "c"]);
    assert_eq!(names(&used.labels), ["instance", "le", "x", "y", "z"]);
    let mut used = Used::default();
    template_labels("{{ $labels.pod }} {{container}} {{ $value | humanize }}", &mut used);
    assert_eq!(names(&used.labels), ["container", "pod"]);
}
