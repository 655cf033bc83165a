//! `murmur-coordinator`'s options as given, and checked: every bad value
//! is refused before anything starts, with the flag and the value named.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use libp2p::pnet::PreSharedKey;
use libp2p::{Multiaddr, PeerId};
use murmur_core::api::{ApiTls, ApiToken};
use murmur_core::mix::aggregate::Aggregator;
use murmur_core::net::security::Security;
use murmur_core::net::swarm::{parse_allowlist, read_swarm_key};

use crate::sampling::{SamplerConfig, Target};

/// Where the averages go, as a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetArg {
    /// Sampled-to-sampled: the average goes back to the sampled members.
    S2s,
    /// Sampled-to-all: the average goes to every live member.
    S2a,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressFormat {
    Text,
    Json,
}

/// The coordinator of a murmur run: samples K members every H_s rounds,
/// averages their models and sends the average to the sampled (s2s) or to
/// everyone (s2a). Nodes join it with `--strategy semidec --coordinator
/// MULTIADDR` (gossip plus its averages) or `--strategy fedavg` (its
/// averages only). It links no libtorch.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "murmur-coordinator", version)]
pub struct CoordinatorOptions {
    /// The coordinator's directory: its identity key (kept, so that a
    /// restarted coordinator has the same peer id and the nodes' --coordinator
    /// address stays valid)
    #[arg(long, env = "MURMUR_COORDINATOR_DIR", default_value = "murmur-coordinator")]
    pub dir: PathBuf,
    /// Name of the run it coordinates; other runs are ignored
    #[arg(long, env = "MURMUR_RUN_ID", default_value = "murmur")]
    pub run_id: String,
    /// Where averages go: s2s (back to the sampled) or s2a (to every live member)
    #[arg(long, env = "MURMUR_TARGET", value_enum, default_value = "s2a")]
    pub target: TargetArg,
    /// Members sampled per sampling round (K); fewer when fewer are live
    #[arg(long, env = "MURMUR_SAMPLE", default_value_t = 4, allow_negative_numbers = true)]
    pub sample: i64,
    /// Rounds between two sampling rounds (H_s); the first is round H_s - 1. With --target s2a and 1 it is federated averaging
    #[arg(long, env = "MURMUR_SAMPLE_EVERY", default_value_t = 1, allow_negative_numbers = true)]
    pub sample_every: i64,
    /// Live training members to wait for before the first sampling round [default: --sample]
    #[arg(long, env = "MURMUR_MIN_MEMBERS", allow_negative_numbers = true)]
    pub min_members: Option<i64>,
    /// Seeds every sample, with the round: the same seed and membership give the same sample
    #[arg(long, env = "MURMUR_SEED", default_value_t = 0)]
    pub seed: u64,
    /// How the sampled models combine: mean, median, trimmed-mean:BETA, krum:F
    #[arg(long, env = "MURMUR_AGGREGATOR", default_value = "mean")]
    pub aggregator: String,
    /// How long the other sampled members have after the first answer, in milliseconds
    #[arg(long, env = "MURMUR_DEADLINE_MS", default_value_t = 5000, allow_negative_numbers = true)]
    pub deadline_ms: i64,
    /// How long the first answer may take after the request, in milliseconds (the members may be up to H_s rounds from the round asked for)
    #[arg(
        long,
        env = "MURMUR_PATIENCE_MS",
        default_value_t = 300_000,
        allow_negative_numbers = true
    )]
    pub patience_ms: i64,
    /// Weigh each answer by the training examples its member declares, refusing a declaration above this; off: every answer counts once (a declared size is a claim)
    #[arg(long, env = "MURMUR_MAX_WEIGHT", allow_negative_numbers = true)]
    pub max_weight: Option<f64>,
    /// Multiaddr to listen on, repeatable
    #[arg(
        long,
        env = "MURMUR_LISTEN",
        value_delimiter = ',',
        default_value = "/ip4/0.0.0.0/tcp/0"
    )]
    pub listen: Vec<String>,
    /// Multiaddr of a node to join through, with /p2p/PEER_ID or by name without it (/dns4/node-0/tcp/4001); repeatable (nodes given --coordinator dial it anyway)
    #[arg(long, env = "MURMUR_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<String>,
    /// Security handshakes for TCP connections, preferred first: tls, noise, or both
    #[arg(long, env = "MURMUR_SECURITY", default_value = "tls,noise")]
    pub security: String,
    /// Private swarm key file: only peers with the same key connect (as the nodes' --swarm-key)
    #[arg(long, env = "MURMUR_SWARM_KEY")]
    pub swarm_key: Option<PathBuf>,
    /// Only these peers may connect; repeatable
    #[arg(long, env = "MURMUR_ALLOW_PEER", value_delimiter = ',')]
    pub allow_peer: Option<Vec<String>>,
    /// The most members it counts; heartbeats of more are refused
    #[arg(long, env = "MURMUR_MAX_MEMBERS", default_value_t = 256, allow_negative_numbers = true)]
    pub max_members: i64,
    /// gRPC API (CoordinatorService, health, reflection): HOST:PORT, or off
    #[arg(long, env = "MURMUR_API", default_value = "127.0.0.1:0")]
    pub api: String,
    /// File holding the token the Shutdown call needs
    #[arg(long, env = "MURMUR_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// PEM certificate for the API (with --api-tls-key): clients dial https://
    #[arg(long, env = "MURMUR_API_TLS_CERT")]
    pub api_tls_cert: Option<PathBuf>,
    #[arg(long, env = "MURMUR_API_TLS_KEY")]
    pub api_tls_key: Option<PathBuf>,
    /// Serve Prometheus /metrics on HOST:PORT
    #[arg(long, env = "MURMUR_METRICS")]
    pub metrics: Option<String>,
    /// Progress lines as text or JSON
    #[arg(long, env = "MURMUR_PROGRESS", value_enum, default_value = "text")]
    pub progress: ProgressFormat,
}

/// Validated options.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub dir: PathBuf,
    pub run_id: String,
    pub sampler: SamplerConfig,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub security: Vec<Security>,
    pub swarm_key: Option<PreSharedKey>,
    pub allowlist: Option<Vec<PeerId>>,
    pub max_members: usize,
    pub api: Option<SocketAddr>,
    pub api_token: Option<ApiToken>,
    pub api_tls: Option<ApiTls>,
    pub metrics: Option<SocketAddr>,
    pub progress: ProgressFormat,
}

/// A value that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

fn positive(flag: &str, v: i64) -> Result<u64, ConfigError> {
    u64::try_from(v)
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(|| bad(format!("{flag} must be > 0 (got {v})")))
}

fn multiaddrs(flag: &str, list: &[String]) -> Result<Vec<Multiaddr>, ConfigError> {
    list.iter()
        .map(|a| {
            a.trim().parse().map_err(|e| bad(format!("{flag} {a:?} is not a multiaddr ({e})")))
        })
        .collect()
}

fn socket(flag: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    murmur_core::api::server::parse_listen(flag, text).map_err(bad)
}

impl CoordinatorOptions {
    pub fn resolve(&self) -> Result<CoordinatorConfig, ConfigError> {
        murmur_core::net::swarm::check_run_id(&self.run_id)
            .map_err(|e| bad(format!("--run-id: {e}")))?;
        let aggregator: Aggregator =
            self.aggregator.parse().map_err(|e| bad(format!("--aggregator: {e}")))?;
        let max_weight = match self.max_weight {
            None => None,
            Some(w) if w.is_finite() && w > 0.0 => Some(w),
            Some(w) => {
                return Err(bad(format!("--max-weight must be a positive number (got {w})")));
            }
        };
        let sampler = SamplerConfig {
            seed: self.seed,
            sample_every: positive("--sample-every", self.sample_every)?,
            sample_size: positive("--sample", self.sample)? as usize,
            target: match self.target {
                TargetArg::S2s => Target::Sampled,
                TargetArg::S2a => Target::All,
            },
            deadline: Duration::from_millis(positive("--deadline-ms", self.deadline_ms)?),
            min_members: positive("--min-members", self.min_members.unwrap_or(self.sample))?
                as usize,
            patience: Duration::from_millis(positive("--patience-ms", self.patience_ms)?),
            member_expiry: Duration::from_secs(10),
            aggregator,
            elements: 0,
            max_weight,
        };
        let swarm_key = self.swarm_key.as_deref().map(read_swarm_key).transpose().map_err(bad)?;
        let allowlist = self.allow_peer.as_deref().map(parse_allowlist).transpose().map_err(bad)?;
        Ok(CoordinatorConfig {
            dir: self.dir.clone(),
            run_id: self.run_id.clone(),
            sampler,
            listen: multiaddrs("--listen", &self.listen)?,
            bootstrap: multiaddrs("--bootstrap", &self.bootstrap)?,
            security: Security::parse_list(&self.security)
                .map_err(|e| bad(format!("--security: {e}")))?,
            swarm_key,
            allowlist,
            max_members: positive("--max-members", self.max_members)? as usize,
            api: match self.api.trim() {
                "off" => None,
                a => Some(socket("--api", a)?),
            },
            api_token: self
                .api_token_file
                .as_deref()
                .map(ApiToken::from_file)
                .transpose()
                .map_err(|e| bad(format!("--api-token-file: {e}")))?,
            api_tls: match (&self.api_tls_cert, &self.api_tls_key) {
                (None, None) => None,
                (Some(cert), Some(key)) => Some(ApiTls::load(cert, key).map_err(bad)?),
                (Some(_), None) => return Err(bad("--api-tls-cert needs --api-tls-key")),
                (None, Some(_)) => return Err(bad("--api-tls-key needs --api-tls-cert")),
            },
            metrics: self.metrics.as_deref().map(|m| socket("--metrics", m)).transpose()?,
            progress: self.progress,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Result<CoordinatorConfig, String> {
        let mut all = vec!["murmur-coordinator"];
        all.extend_from_slice(args);
        let opts = CoordinatorOptions::try_parse_from(all).map_err(|e| e.to_string())?;
        opts.resolve().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_federated_averaging_over_four() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.sampler.target, Target::All);
        assert_eq!((c.sampler.sample_size, c.sampler.sample_every), (4, 1));
        assert_eq!(c.sampler.max_weight, None);
        assert!(c.api.is_some_and(|a| a.ip().is_loopback()));
    }

    #[test]
    fn bad_values_are_named() {
        for (args, names) in [
            (&["--sample", "0"][..], "--sample must be > 0 (got 0)"),
            (&["--sample-every", "-2"][..], "--sample-every must be > 0 (got -2)"),
            (&["--deadline-ms", "0"][..], "--deadline-ms must be > 0"),
            (&["--aggregator", "avg"][..], "--aggregator"),
            (&["--max-weight", "-1"][..], "--max-weight must be a positive number (got -1)"),
            (&["--listen", "nowhere"][..], "--listen \"nowhere\""),
            (&["--allow-peer", "bob"][..], "--allow-peer \"bob\""),
            (&["--api", "7080"][..], "--api \"7080\""),
            (&["--run-id", "a b"][..], "--run-id"),
            (&["--api-tls-cert", "c.pem"][..], "--api-tls-cert needs --api-tls-key"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(names), "{args:?}: {err}");
        }
    }
}
