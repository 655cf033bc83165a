//! Hosts on one box: one network namespace per node, each with its own IP
//! on a veth pair into a bridge, and faults on those links as a real
//! network would have them.
//!
//! This kernel has no netem, so each fault is made with what it does have:
//! random loss and partitions are nftables drops on the node's ingress (a
//! drop on egress would hand the sender EPERM, which no real network does),
//! a rate cap is a `tbf` qdisc on both ends of the node's link, and a cut is
//! the link set down. Delay stays with murmur's own injector.
//!
//! The runner (in the host's namespace) owns the bridge's address and reads
//! every node's API through it; loss never applies to it and partitions
//! only name nodes, so a node's status stays readable through its faults,
//! except while its link is cut. Namespaces are named `murmur-PID-I` and
//! deleted when the `Hosts` is dropped; ones left by a runner that died
//! (its PID gone) are deleted by the next one.

use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::cli::cluster::Place;

/// The network prefix: hosts get 10.213.X.(i+1), the runner 10.213.X.254.
const PREFIX: [u8; 2] = [10, 213];
/// At most this many nodes fit in a /24 beside the runner.
pub const MAX_HOSTS: usize = 250;

/// A link's shape: random ingress loss and a rate cap in bits per second.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Shape {
    pub loss: f64,
    pub rate_bits: Option<u64>,
}

/// What nftables dropped on one node's ingress.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Drops {
    /// Packets dropped by the random loss rule.
    pub loss_packets: u64,
    /// Packets dropped because they came from the other side of a partition.
    pub partition_packets: u64,
}

/// The namespaces, veth pairs and bridge of one run.
pub struct Hosts {
    tag: u32,
    subnet: u8,
    n: usize,
    shapes: Vec<Shape>,
    blocked: Vec<Vec<Ipv4Addr>>,
}

impl Hosts {
    /// Makes `n` hosts. Needs root and the `ip`, `nft` and `tc` commands.
    pub fn create(n: usize) -> Result<Hosts, String> {
        preflight()?;
        if n == 0 || n > MAX_HOSTS {
            return Err(format!("netns: {n} nodes do not fit (1..={MAX_HOSTS})"));
        }
        remove_stale();
        // One subnet per live run: chosen and claimed under a lock.
        let lock = File::create("/run/murmur-netns.lock")
            .map_err(|e| format!("netns: cannot open /run/murmur-netns.lock: {e}"))?;
        lock.lock().map_err(|e| format!("netns: cannot lock /run/murmur-netns.lock: {e}"))?;
        let tag = std::process::id();
        let used = sh(&["ip", "-o", "-4", "addr", "show"])?;
        let subnet = (0..=255u16)
            .map(|k| ((tag as u16).wrapping_add(k) % 256) as u8)
            .find(|x| !used.contains(&format!("{}.{}.{x}.", PREFIX[0], PREFIX[1])))
            .ok_or("netns: every 10.213.X.0/24 is in use")?;
        let mut hosts = Hosts { tag, subnet, n: 0, shapes: vec![], blocked: vec![] };
        let bridge = hosts.bridge();
        // Bridged frames skip the host's own firewall (a FORWARD policy of
        // drop would otherwise cut every link).
        sh(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        sh(&[
            "ip",
            "link",
            "set",
            &bridge,
            "type",
            "bridge",
            "nf_call_iptables",
            "0",
            "nf_call_ip6tables",
            "0",
            "nf_call_arptables",
            "0",
        ])?;
        sh(&["ip", "addr", "add", &format!("{}/24", hosts.runner_ip()), "dev", &bridge])?;
        sh(&["ip", "link", "set", &bridge, "up"])?;
        drop(lock);
        for i in 0..n {
            hosts.add(i)?;
        }
        Ok(hosts)
    }

    fn bridge(&self) -> String {
        format!("mm{}b", self.tag)
    }

    /// The host side of node `i`'s veth pair.
    fn veth(&self, i: usize) -> String {
        format!("mm{}h{i}", self.tag)
    }

    /// Node `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("murmur-{}-{i}", self.tag)
    }

    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(PREFIX[0], PREFIX[1], self.subnet, i as u8 + 1)
    }

    /// The runner's address on the bridge.
    pub fn runner_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(PREFIX[0], PREFIX[1], self.subnet, 254)
    }

    fn add(&mut self, i: usize) -> Result<(), String> {
        let (ns, veth, inside) = (self.ns(i), self.veth(i), format!("mm{}n{i}", self.tag));
        sh(&["ip", "netns", "add", &ns])?;
        self.n = i + 1;
        self.shapes.push(Shape::default());
        self.blocked.push(Vec::new());
        sh(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", &inside])?;
        sh(&["ip", "link", "set", &inside, "netns", &ns])?;
        sh(&["ip", "-n", &ns, "link", "set", &inside, "name", "eth0"])?;
        sh(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", self.ip(i)), "dev", "eth0"])?;
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        sh(&["ip", "link", "set", &veth, "master", &self.bridge()])?;
        sh(&["ip", "link", "set", &veth, "up"])?;
        nft(
            &ns,
            "table inet murmur {\n counter loss {}\n counter partition {}\n \
             chain ingress { type filter hook input priority 0; policy accept; }\n}\n",
        )
    }

    /// Where node `i` runs.
    pub fn place(&self, i: usize) -> Place {
        Place::Netns { ns: self.ns(i), ip: self.ip(i) }
    }

    /// Node `i`'s link's shape now.
    pub fn shape_of(&self, i: usize) -> Shape {
        self.shapes[i]
    }

    /// Sets node `i`'s link to `shape`: loss on its ingress, the rate cap
    /// on both ends.
    pub fn shape(&mut self, i: usize, shape: Shape) -> Result<(), String> {
        if shape.rate_bits != self.shapes[i].rate_bits {
            let (ns, veth) = (self.ns(i), self.veth(i));
            let ends: [(Vec<&str>, &str); 2] =
                [(vec!["tc", "-n", &ns], "eth0"), (vec!["tc"], &veth)];
            for (mut tc, dev) in ends {
                match shape.rate_bits {
                    Some(bits) => {
                        // A burst of at least 10 ms at the rate (the timer
                        // tick), and never under a few full frames.
                        let burst = (bits / 8 / 100).max(16 * 1024);
                        let (rate, burst) = (format!("{bits}bit"), burst.to_string());
                        tc.extend(["qdisc", "replace", "dev", dev, "root", "tbf"]);
                        tc.extend(["rate", &rate, "burst", &burst, "latency", "200ms"]);
                        sh(&tc)?;
                    }
                    None => {
                        tc.extend(["qdisc", "del", "dev", dev, "root"]);
                        // No qdisc of ours to delete is not an error.
                        let _ = sh(&tc);
                    }
                }
            }
        }
        self.shapes[i] = shape;
        self.rules(i)
    }

    /// Drops what node `i` receives from these nodes (empty: heals).
    pub fn block(&mut self, i: usize, from: &[usize]) -> Result<(), String> {
        self.blocked[i] = from.iter().map(|&j| self.ip(j)).collect();
        self.rules(i)
    }

    /// Sets node `i`'s link down (`up = false`) or up again.
    pub fn link(&self, i: usize, up: bool) -> Result<(), String> {
        sh(&["ip", "link", "set", &self.veth(i), if up { "up" } else { "down" }]).map(drop)
    }

    /// Writes node `i`'s ingress rules anew (the named counters persist).
    fn rules(&self, i: usize) -> Result<(), String> {
        let mut text = String::from("flush chain inet murmur ingress\n");
        if !self.blocked[i].is_empty() {
            let ips: Vec<String> = self.blocked[i].iter().map(ToString::to_string).collect();
            text += &format!(
                "add rule inet murmur ingress ip saddr {{ {} }} counter name \"partition\" drop\n",
                ips.join(", ")
            );
        }
        let loss = self.shapes[i].loss;
        if loss > 0.0 {
            let per_million = (loss * 1e6).round() as u64;
            text += &format!(
                "add rule inet murmur ingress ip saddr != {} numgen random mod 1000000 < {per_million} counter name \"loss\" drop\n",
                self.runner_ip()
            );
        }
        nft(&self.ns(i), &text)
    }

    /// What nftables has dropped on node `i`'s ingress so far.
    pub fn drops(&self, i: usize) -> Drops {
        let read = |name: &str| -> u64 {
            sh(&[
                "ip",
                "netns",
                "exec",
                &self.ns(i),
                "nft",
                "list",
                "counter",
                "inet",
                "murmur",
                name,
            ])
            .ok()
            .and_then(|t| {
                let at = t.find("packets ")? + "packets ".len();
                t[at..].split_whitespace().next()?.parse().ok()
            })
            .unwrap_or(0)
        };
        Drops { loss_packets: read("loss"), partition_packets: read("partition") }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for i in 0..self.n {
            let _ = sh(&["ip", "netns", "del", &self.ns(i)]);
        }
        let _ = sh(&["ip", "link", "del", &self.bridge()]);
    }
}

/// Root, and the commands the hosts are made with.
fn preflight() -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
    if uid != 0 {
        return Err(format!(
            "netns needs root (network namespaces, nftables and tc); this runs as uid {uid}"
        ));
    }
    for (tool, arg, package) in
        [("ip", "-V", "iproute2"), ("tc", "-V", "iproute2"), ("nft", "-v", "nftables")]
    {
        let found = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(format!(
                "netns needs the {tool} command (package {package}; scripts/setup-netns.sh installs it)"
            ));
        }
    }
    Ok(())
}

/// Deletes the namespaces and bridges of runners that are gone.
fn remove_stale() {
    let gone = |tag: &str| {
        tag.parse::<u32>().is_ok_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
    };
    if let Ok(list) = sh(&["ip", "netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if let Some(tag) = name.strip_prefix("murmur-").and_then(|r| r.split('-').next())
                && gone(tag)
            {
                let _ = sh(&["ip", "netns", "del", name]);
            }
        }
    }
    if let Ok(links) = sh(&["ip", "-o", "link", "show", "type", "bridge"]) {
        for name in links.lines().filter_map(|l| l.split(": ").nth(1)) {
            if let Some(tag) = name.strip_prefix("mm").and_then(|r| r.strip_suffix('b'))
                && gone(tag)
            {
                let _ = sh(&["ip", "link", "del", name]);
            }
        }
    }
}

/// Runs a command; its stdout, or an error naming it and what it said.
fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", args[0]))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Applies an nftables script inside namespace `ns`.
fn nft(ns: &str, script: &str) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(|e| format!("nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nft in {ns} failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A rate as tc writes it (100mbit, 512kbit, 1gbit, 2000000bit) in bits
/// per second.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    let (digits, mult) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
        .iter()
        .find_map(|(unit, m)| t.strip_suffix(unit).map(|d| (d.trim(), *m)))
        .ok_or_else(|| {
            format!("rate {text:?} must be a number with kbit, mbit or gbit, as in 100mbit")
        })?;
    let v: f64 =
        digits.parse().map_err(|_| format!("rate {text:?}: {digits:?} is not a number"))?;
    let bits = v * mult;
    if !(bits.is_finite() && (8_000.0..=100e9).contains(&bits)) {
        return Err(format!("rate {text:?} must be within 8kbit..100gbit"));
    }
    Ok(bits as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_as_tc_writes_them() {
        assert_eq!(parse_rate("100mbit"), Ok(100_000_000));
        assert_eq!(parse_rate("1.5Mbit"), Ok(1_500_000));
        assert_eq!(parse_rate("512kbit"), Ok(512_000));
        assert_eq!(parse_rate("1gbit"), Ok(1_000_000_000));
        assert!(parse_rate("100").unwrap_err().contains("\"100\""));
        assert!(parse_rate("fastmbit").unwrap_err().contains("\"fast\""));
        assert!(parse_rate("1kbit").unwrap_err().contains("8kbit"));
    }
}
