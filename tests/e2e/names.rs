//! Peers found by name: what compose services and Kubernetes pods give a
//! node is a host name and a port, not a peer id.

use std::path::Path;
use std::time::Duration;

use crate::coordinator::LiveCoordinator;
use crate::harness::{murmur, ok, read_json, s};
use crate::swarm::LiveNode;

/// The TCP port of a `/ip4/.../tcp/PORT/p2p/ID` address.
fn port(addr: &str) -> &str {
    addr.split("/tcp/").nth(1).unwrap().split('/').next().unwrap()
}

/// Three nodes and a coordinator on 127.0.0.1, every one found through
/// `/dns4/localhost/tcp/PORT`: the run forms, the coordinator's averages
/// arrive, and every node finishes.
#[test]
fn nodes_find_the_run_and_the_coordinator_by_name_without_peer_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let root: &Path = tmp.path();
    let coord_dir = root.join("coordinator");
    std::fs::create_dir_all(&coord_dir).unwrap();
    let coordinator = LiveCoordinator::start(
        &coord_dir,
        "/ip4/127.0.0.1/tcp/0",
        &["--sample", "2", "--sample-every", "2", "--deadline-ms", "2000"],
    );
    let by_name = format!("/dns4/localhost/tcp/{}", port(&coordinator.addr));
    let args = [
        "--data",
        "synthetic",
        "--hidden",
        "32",
        "--rounds",
        "16",
        "--local-steps",
        "5",
        "--round-timeout-ms",
        "3000",
        "--min-members",
        "3",
        "--strategy",
        "semidec",
        "--coordinator",
        &by_name,
    ];
    let first = LiveNode::start(&root.join("node-0"), 0, 3, None, &args);
    let boot = format!("/dns4/localhost/tcp/{}", port(&first.p2p));
    let mut nodes = vec![first];
    for i in 1..3 {
        nodes.push(LiveNode::start(&root.join(format!("node-{i}")), i, 3, Some(&boot), &args));
    }
    // The run is short: read what each node says once it ends.
    for node in &mut nodes {
        assert_eq!(node.wait_exit(Duration::from_secs(120)), 0);
        let summary = read_json(&node.dir.join("summary.json"));
        assert_eq!(summary["members_at_start"], 3, "{summary}");
        assert_eq!(summary["rounds"], 16);
        let link = &summary["coordinator"];
        assert!(link["averages"].as_u64().unwrap() >= 2, "{link}");
    }
    let c = coordinator.status();
    assert!(c["rounds_aggregated"].as_u64().unwrap() >= 2, "{c}");
}

/// The README's "Across machines" recipe on 127.0.0.1, `localhost` standing
/// for the host names: one swarm key, the allowlist from `murmur id`, the
/// API behind a token, node 1 bootstrapping from node 0 by name.
#[test]
fn the_across_machines_recipe_forms_a_private_run_found_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let key = root.join("swarm.key");
    ok(&murmur(&["swarm-key", s(&key)]));
    let dirs = [root.join("a"), root.join("b")];
    let ids: Vec<String> =
        dirs.iter().map(|d| ok(&murmur(&["id", "--data-dir", s(d)])).trim().to_string()).collect();
    let allow = ids.join(",");
    let token = root.join("api-token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--swarm-key",
            s(&key),
            "--allow-peer",
            &allow,
            "--api-token-file",
            s(&token),
            "--data",
            "synthetic",
            "--rounds",
            "8",
            "--local-steps",
            "5",
            "--min-members",
            "2",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let a_args = args(&[]);
    let a_refs: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let a = LiveNode::start(&dirs[0], 0, 2, None, &a_refs);
    assert_eq!(a.peer_id, ids[0], "murmur id printed the node's peer id");
    let by_name = format!("/dns4/localhost/tcp/{}", port(&a.p2p));
    let b_args = args(&["--bootstrap", &by_name]);
    let b_refs: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let mut b = LiveNode::start(&dirs[1], 1, 2, None, &b_refs);
    assert_eq!(b.wait_exit(Duration::from_secs(90)), 0);
    let summary = read_json(&dirs[1].join("summary.json"));
    assert_eq!(summary["members_at_start"], 2, "{summary}");
    assert_eq!(summary["rounds"], 8);
    let mut a = a;
    assert_eq!(a.wait_exit(Duration::from_secs(30)), 0);
    assert_eq!(read_json(&dirs[0].join("summary.json"))["members_at_start"], 2);
}
