//! The node API end to end: an independent Python gRPC client (reflection,
//! health, dynamic messages), the API token, `murmur status` (table, JSON,
//! watch) and Prometheus `/metrics`, on live nodes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{murmur, murmur_bin, read_json, s};
use crate::swarm::{LiveNode, grpc_client, start_swarm};

/// A synthetic run long enough to talk to while it trains.
const LONG_RUN: &[&str] = &[
    "--data",
    "synthetic",
    "--hidden",
    "32",
    "--rounds",
    "100000",
    "--local-steps",
    "10",
    "--round-timeout-ms",
    "2000",
];

const TOKEN: &str = "e2e-s3cret-token";

fn int(v: &Value) -> u64 {
    // The Python client prints 64-bit integers as strings (proto3 JSON).
    v.as_u64().or_else(|| v.as_str().and_then(|t| t.parse().ok())).unwrap_or(0)
}

#[test]
fn an_independent_python_client_lists_services_checks_health_and_reads_status() {
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = start_swarm(tmp.path(), 2, LONG_RUN);
    let api = nodes[0].api.clone();
    let services = grpc_client(&api, &["services"]);
    for want in ["murmur.v1.NodeService", "grpc.health.v1.Health"] {
        assert!(services.as_array().unwrap().iter().any(|s| s == want), "{want} not in {services}");
    }
    assert_eq!(grpc_client(&api, &["health"]), "SERVING");
    assert_eq!(grpc_client(&api, &["health", "murmur.v1.NodeService"]), "SERVING");
    nodes[0].wait_for("training with its peer", Duration::from_secs(60), |st| {
        st["round"].as_u64() >= Some(2)
    });
    let status = grpc_client(&api, &["call", "GetStatus"]);
    assert_eq!(status["peer_id"], nodes[0].peer_id.as_str());
    assert_eq!(status["strategy"], "gossip");
    assert!(int(&status["round"]) >= 2, "{status}");
    assert!(int(&status["traffic"]["bytes_sent"]) > 0, "{status}");
    assert_eq!(status["live_members"], 2);
    assert_eq!(status["model_hash"].as_str().unwrap().len(), 8);
    let peers = grpc_client(&api, &["call", "ListPeers"]);
    let other = peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == nodes[1].peer_id.as_str());
    let other = other.unwrap_or_else(|| panic!("node 1 not among {peers}"));
    assert_eq!((other["connected"].as_bool(), other["member"].as_bool()), (Some(true), Some(true)));
    assert!(int(&other["traffic"]["bytes_received"]) > 0, "{other}");
    // At most 16 WatchStatus streams at once; the rest are told why, and
    // closed streams give their places back.
    let watch = grpc_client(&api, &["watchers", "20"]);
    assert_eq!(watch["opened"], 16, "{watch}");
    assert_eq!(watch["refused"], serde_json::json!(vec!["RESOURCE_EXHAUSTED"; 4]), "{watch}");
    std::thread::sleep(Duration::from_secs(3));
    let again = grpc_client(&api, &["watchers", "16"]);
    assert_eq!(again["opened"], 16, "{again}");
    // No token configured: control calls are open.
    for node in &mut nodes {
        assert_eq!(grpc_client(&node.api, &["call", "Shutdown"]), serde_json::json!({}));
        assert_eq!(node.wait_exit(Duration::from_secs(60)), 0);
        assert_eq!(read_json(&node.dir.join("summary.json"))["interrupted"], true);
    }
}

#[test]
fn control_calls_need_the_token_and_status_calls_do_not() {
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("api.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    // The token file and a first fault come from the config file.
    let config = tmp.path().join("node.toml");
    let toml = format!("api-token-file = {:?}\nfault = [\"delay:1ms,for=1h\"]\n", s(&token_file));
    std::fs::write(&config, toml).unwrap();
    let mut args = LONG_RUN.to_vec();
    args.extend(["--config", s(&config)]);
    let mut node = LiveNode::start(&tmp.path().join("node-0"), 0, 1, None, &args);
    let api = node.api.clone();
    assert_eq!(node.status()["active_faults"][0]["spec"], "delay:1ms,for=3600s");
    // Status calls: no token needed.
    assert_eq!(grpc_client(&api, &["call", "GetStatus"])["peer_id"], node.peer_id.as_str());
    assert!(grpc_client(&api, &["call", "ListPeers"]).get("code").is_none());
    // Control calls: refused without the token or with a wrong one, and nothing changes.
    for (method, body) in [
        ("InjectFault", r#"{"spec": "drop:0.5"}"#),
        ("ClearFaults", "{}"),
        ("SaveCheckpoint", "{}"),
        ("Shutdown", "{}"),
    ] {
        for token in [None, Some("wrong-token-123")] {
            let mut a = vec!["call", method, body];
            if let Some(t) = token {
                a.extend(["--token", t]);
            }
            let r = grpc_client(&api, &a);
            assert_eq!(r["code"], "UNAUTHENTICATED", "{method} with {token:?}: {r}");
        }
    }
    let st = node.status();
    assert_eq!(st["active_faults"].as_array().unwrap().len(), 1, "only the config's: {st}");
    assert_eq!(st["phase"].as_str().map(|p| p != "finishing"), Some(true), "still running: {st}");
    assert!(!node.dir.join("checkpoint/meta.json").exists(), "no checkpoint was written");
    // murmur's own client: the same refusal, then success with the token.
    let denied = murmur(&["fault", "inject", &api, "drop:0.5"]);
    assert_eq!(denied.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&denied.stderr).contains("API token"), "{denied:?}");
    let file_arg = ["--api-token-file", s(&token_file)];
    let ok = murmur(&[&["fault", "inject", &api, "drop:0.5,for=1h"][..], &file_arg].concat());
    assert!(ok.status.success(), "{ok:?}");
    let st = node.status();
    assert_eq!(st["active_faults"][1]["spec"], "drop:0.5,for=3600s");
    let typed = grpc_client(
        &api,
        &["call", "InjectFault", r#"{"fault": {"delay": {"delay_ms": 5}}}"#, "--token", TOKEN],
    );
    assert_eq!(typed["fault"]["spec"], "delay:5ms", "{typed}");
    let cleared = grpc_client(&api, &["call", "ClearFaults", "{}", "--token", TOKEN]);
    assert_eq!(cleared["cleared"], 3);
    let saved = grpc_client(&api, &["call", "SaveCheckpoint", "{}", "--token", TOKEN]);
    assert!(int(&saved["step"]) > 0, "{saved}");
    let meta = read_json(&node.dir.join("checkpoint/meta.json"));
    assert_eq!(meta["step"].as_u64(), Some(int(&saved["step"])));
    // Bad input is refused with the value named, and changes nothing.
    let bad =
        grpc_client(&api, &["call", "InjectFault", r#"{"spec": "drop:7"}"#, "--token", TOKEN]);
    assert_eq!(bad["code"], "INVALID_ARGUMENT");
    assert!(bad["details"].as_str().unwrap().contains("(got 7)"), "{bad}");
    let down = murmur(&[&["shutdown", &api][..], &file_arg].concat());
    assert!(down.status.success(), "{down:?}");
    assert_eq!(node.wait_exit(Duration::from_secs(60)), 0);
    assert_eq!(read_json(&node.dir.join("summary.json"))["interrupted"], true);
}

/// `GET /metrics` over a plain socket.
fn scrape(addr: &str) -> String {
    let mut conn = TcpStream::connect(addr).unwrap();
    write!(conn, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in\n{text}"))
}

#[test]
fn status_table_watch_and_metrics_follow_live_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = LONG_RUN.to_vec();
    args.extend(["--metrics", "127.0.0.1:0"]);
    let nodes = start_swarm(tmp.path(), 2, &args);
    nodes[0]
        .wait_for("a few rounds", Duration::from_secs(60), |st| st["round"].as_u64() >= Some(3));
    // Prometheus: the same figures as the status, moving.
    let metrics = nodes[0].metrics.clone().expect("--metrics prints its address");
    let first = scrape(&metrics);
    assert!(first.contains("application/openmetrics-text"), "{first}");
    assert!(first.contains(&format!("peer_id=\"{}\"", nodes[0].peer_id)));
    assert_eq!(metric(&first, "murmur_live_members"), 2.0);
    let step = metric(&first, "murmur_step");
    assert!(metric(&first, "murmur_bytes_sent_total") > 0.0);
    nodes[0].wait_for("more steps", Duration::from_secs(30), |st| {
        st["step"].as_f64() > Some(step + 20.0)
    });
    assert!(metric(&scrape(&metrics), "murmur_step") > step);
    // The table: both nodes, and a dead address makes it fail with a row saying so.
    let dead = "127.0.0.1:9";
    let table = murmur(&["status", &nodes[0].api, &nodes[1].api, dead]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert_eq!(table.status.code(), Some(1), "{text}");
    assert_eq!(text.lines().count(), 4, "header and three rows: {text}");
    assert!(
        text.contains(&nodes[1].api) && text.contains("cannot reach the node API at 127.0.0.1:9"),
        "{text}"
    );
    // --watch --json: one line per change, with steps that only go forward.
    let mut watch = Command::new(murmur_bin())
        .args(["status", "--watch", "--json", "--interval-ms", "200", &nodes[1].api])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let steps: Vec<u64> = lines
        .take(4)
        .map(|l| serde_json::from_str::<Value>(&l.unwrap()).unwrap()["step"].as_u64().unwrap())
        .collect();
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]) && steps[3] > steps[0], "{steps:?}");
}

#[test]
fn the_api_over_tls_serves_a_client_that_trusts_its_certificate_and_no_other() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    let made = murmur(&["api-cert", s(&tls)]);
    assert!(made.status.success(), "{made:?}");
    let (cert, key) = (tls.join("api-cert.pem"), tls.join("api-key.pem"));
    let token_file = tmp.path().join("api.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    // One flag of the pair alone is refused, naming the other.
    let half_dir = tmp.path().join("half");
    let mut half = LONG_RUN.to_vec();
    half.extend(["--data-dir", s(&half_dir), "--api-tls-cert", s(&cert)]);
    let refused = murmur(&[&["run"][..], &half].concat());
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("needs --api-tls-key"),
        "{refused:?}"
    );
    let mut args = LONG_RUN.to_vec();
    args.extend(["--api-tls-cert", s(&cert), "--api-tls-key", s(&key)]);
    args.extend(["--api-token-file", s(&token_file)]);
    let mut node = LiveNode::start(&tmp.path().join("node-0"), 0, 1, None, &args);
    assert!(node.api.starts_with("https://127.0.0.1:"), "{}", node.api);
    // Trusting the self-signed certificate: status reads.
    let ca = ["--api-ca", s(&cert)];
    let read = murmur(&[&["status", "--json", &node.api][..], &ca].concat());
    assert!(read.status.success(), "{read:?}");
    let all: Value = serde_json::from_slice(&read.stdout).unwrap();
    assert_eq!(all[0]["peer_id"], node.peer_id.as_str());
    // Without it (the system's roots do not know it), or in plain HTTP/2: nothing.
    let untrusted = murmur(&["status", &node.api]);
    assert_eq!(untrusted.status.code(), Some(1), "{untrusted:?}");
    let plain = murmur(&["status", node.api.trim_start_matches("https://")]);
    assert_eq!(plain.status.code(), Some(1), "{plain:?}");
    // A control call with the token, over TLS.
    let token = ["--api-token-file", s(&token_file)];
    let stop = murmur(&[&["shutdown", &node.api][..], &ca, &token].concat());
    assert!(stop.status.success(), "{stop:?}");
    assert_eq!(node.wait_exit(Duration::from_secs(60)), 0);
}
