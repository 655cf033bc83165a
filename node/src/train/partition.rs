//! Which training examples each node gets: IID, Dirichlet(alpha) label skew,
//! or k classes per node.
//!
//! Pure functions of (labels, scheme, seed, node count): every node computes
//! the same full assignment and keeps its own shard, so no coordination is
//! needed and the shards are disjoint and cover the data. This module owns no
//! data; it returns indices into the training set.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

/// How the training examples are spread over the nodes (`--partition`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scheme {
    /// A seeded shuffle cut into near-equal parts.
    Iid,
    /// Per class, node proportions drawn from Dirichlet(alpha) (Hsu et al.
    /// 2019): small alpha means strong label skew, large alpha nearly IID.
    Dirichlet { alpha: f64 },
    /// Node i holds classes `(i * k + j) mod C` for `j < k`; each class's
    /// examples are split evenly among the nodes that hold it.
    Classes { k: usize },
    /// `groups:G`: the nodes in G blocks of consecutive indices and the
    /// classes in G groups of consecutive labels (sizes differing by at most
    /// one, as `rings:G` cuts its rings); block g holds group g's examples,
    /// each class split evenly among its nodes. With `--topology rings:G`,
    /// components that each hold only a few classes.
    Groups { g: usize },
}

/// A partition that cannot be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PartitionError {
    #[error(
        "unknown --partition scheme {0:?} (expected iid, dirichlet:ALPHA, classes:K or groups:G)"
    )]
    Unknown(String),
    #[error("--partition dirichlet needs alpha > 0 (got {0}), e.g. dirichlet:0.5")]
    BadAlpha(String),
    #[error("--partition classes needs k >= 1 (got {0}), e.g. classes:2")]
    BadK(String),
    #[error("--partition groups needs g >= 1 (got {0}), e.g. groups:3")]
    BadGroups(String),
    #[error(
        "--partition groups:{g} needs at least {g} nodes and {g} classes (got {nodes} nodes, {num_classes} classes)"
    )]
    TooManyGroups { g: usize, nodes: usize, num_classes: usize },
    #[error("a partition needs at least one node (got 0)")]
    NoNodes,
    #[error("node index {node} is out of range for {nodes} nodes (expected 0..{nodes})")]
    NodeOutOfRange { node: usize, nodes: usize },
    #[error("label {label} of example {index} is outside 0..{num_classes}")]
    BadLabel { index: usize, label: i64, num_classes: usize },
    #[error(
        "--partition classes:{k} with {nodes} nodes holds only {held} of the {num_classes} classes; use classes:{need} or more, or at least {min_nodes} nodes"
    )]
    UnheldClasses {
        k: usize,
        nodes: usize,
        num_classes: usize,
        held: usize,
        need: usize,
        min_nodes: usize,
    },
    #[error("text data supports only --partition iid (got {0}): text has no labels to skew")]
    TextScheme(String),
}

/// Draws of Dirichlet proportions tried before empty nodes are filled by hand.
const MAX_DRAWS: usize = 64;

/// For each node, the sorted indices of its examples. The shards are disjoint
/// and cover `0..labels.len()`; they depend only on the arguments.
///
/// Dirichlet redraws all proportions (up to 64 times) until no node is empty,
/// then moves single examples from the largest shards to any node still
/// empty, so no node is empty when there are at least as many examples as
/// nodes. `classes:k` refuses a node count that would leave a class unheld
/// (`nodes * k < num_classes`), since the data must be covered and no node may
/// see more than k classes.
pub fn shards(
    labels: &[i64],
    num_classes: usize,
    scheme: &Scheme,
    seed: u64,
    nodes: usize,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    if nodes == 0 {
        return Err(PartitionError::NoNodes);
    }
    scheme.validate()?;
    let classes = class_members(labels, num_classes)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = match *scheme {
        Scheme::Iid => iid(labels.len(), nodes, &mut rng),
        Scheme::Dirichlet { alpha } => dirichlet(&classes, alpha, nodes, &mut rng)?,
        Scheme::Classes { k } => by_classes(classes, k, nodes, &mut rng)?,
        Scheme::Groups { g } => by_groups(classes, g, nodes, &mut rng)?,
    };
    for shard in &mut out {
        shard.sort_unstable();
    }
    Ok(out)
}

/// The sorted indices of node `node`'s examples; see [`shards`].
pub fn shard(
    labels: &[i64],
    num_classes: usize,
    scheme: &Scheme,
    seed: u64,
    node: usize,
    nodes: usize,
) -> Result<Vec<usize>, PartitionError> {
    if node >= nodes {
        return Err(if nodes == 0 {
            PartitionError::NoNodes
        } else {
            PartitionError::NodeOutOfRange { node, nodes }
        });
    }
    Ok(shards(labels, num_classes, scheme, seed, nodes)?.swap_remove(node))
}

/// Node `node`'s contiguous part of a text of `len` tokens: near-equal ranges
/// that cover `0..len` in node order. Empty when `node >= nodes`.
pub fn text_range(len: usize, node: usize, nodes: usize) -> Range<usize> {
    if node >= nodes {
        return 0..0;
    }
    let at = |i: usize| (len as u128 * i as u128 / nodes as u128) as usize;
    at(node)..at(node + 1)
}

/// Text has no labels, so only IID partitions apply to it.
pub fn check_text_scheme(scheme: &Scheme) -> Result<(), PartitionError> {
    match scheme {
        Scheme::Iid => Ok(()),
        other => Err(PartitionError::TextScheme(other.to_string())),
    }
}

impl Scheme {
    /// The checks `from_str` makes, for schemes built in code.
    fn validate(&self) -> Result<(), PartitionError> {
        match *self {
            Scheme::Dirichlet { alpha } if !(alpha > 0.0 && alpha.is_finite()) => {
                Err(PartitionError::BadAlpha(alpha.to_string()))
            }
            Scheme::Classes { k: 0 } => Err(PartitionError::BadK("0".into())),
            Scheme::Groups { g: 0 } => Err(PartitionError::BadGroups("0".into())),
            _ => Ok(()),
        }
    }
}

/// The indices of each class, ascending.
fn class_members(labels: &[i64], num_classes: usize) -> Result<Vec<Vec<usize>>, PartitionError> {
    let mut classes = vec![Vec::new(); num_classes];
    for (index, &label) in labels.iter().enumerate() {
        let members = usize::try_from(label).ok().and_then(|l| classes.get_mut(l));
        members.ok_or(PartitionError::BadLabel { index, label, num_classes })?.push(index);
    }
    Ok(classes)
}

fn iid(len: usize, nodes: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(rng);
    (0..nodes).map(|node| order[text_range(len, node, nodes)].to_vec()).collect()
}

fn dirichlet(
    classes: &[Vec<usize>],
    alpha: f64,
    nodes: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    let gamma = Gamma::new(alpha, 1.0).map_err(|_| PartitionError::BadAlpha(alpha.to_string()))?;
    let total: usize = classes.iter().map(Vec::len).sum();
    let mut out = Vec::new();
    for _ in 0..MAX_DRAWS {
        out = dirichlet_draw(classes, &gamma, nodes, rng);
        if total < nodes || out.iter().all(|s| !s.is_empty()) {
            return Ok(out);
        }
    }
    // Still some empty node (tiny alpha, many nodes): give each one example
    // from the currently largest shard.
    while let Some(empty) = out.iter().position(Vec::is_empty) {
        let largest = (0..nodes).max_by_key(|&i| (out[i].len(), std::cmp::Reverse(i))).unwrap_or(0);
        if let Some(moved) = out[largest].pop() {
            out[empty].push(moved);
        }
    }
    Ok(out)
}

/// One draw: each class's shuffled members cut by Dirichlet proportions.
fn dirichlet_draw(
    classes: &[Vec<usize>],
    gamma: &Gamma<f64>,
    nodes: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); nodes];
    for members in classes {
        let mut members = members.clone();
        members.shuffle(rng);
        let weights: Vec<f64> = (0..nodes).map(|_| gamma.sample(rng)).collect();
        let sum: f64 = weights.iter().sum();
        if !(sum > 0.0 && sum.is_finite()) {
            // Every weight underflowed (alpha far below 1): the limit of the
            // distribution is all mass on one node.
            out[rng.random_range(0..nodes)].extend(members);
            continue;
        }
        let (mut start, mut cum) = (0, 0.0);
        for (node, w) in weights.iter().enumerate() {
            cum += w;
            let end = if node + 1 == nodes {
                members.len()
            } else {
                ((cum / sum * members.len() as f64).round() as usize).clamp(start, members.len())
            };
            out[node].extend_from_slice(&members[start..end]);
            start = end;
        }
    }
    out
}

fn by_classes(
    classes: Vec<Vec<usize>>,
    k: usize,
    nodes: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    let num_classes = classes.len();
    let k = k.min(num_classes);
    if nodes.saturating_mul(k) < num_classes {
        return Err(PartitionError::UnheldClasses {
            k,
            nodes,
            num_classes,
            held: nodes * k,
            need: num_classes.div_ceil(nodes),
            min_nodes: num_classes.div_ceil(k.max(1)),
        });
    }
    let mut holders = vec![Vec::new(); num_classes];
    for node in 0..nodes {
        for j in 0..k {
            holders[(node * k + j) % num_classes].push(node);
        }
    }
    let mut out = vec![Vec::new(); nodes];
    for (mut members, holders) in classes.into_iter().zip(&holders) {
        members.shuffle(rng);
        for (i, &node) in holders.iter().enumerate() {
            out[node].extend_from_slice(&members[text_range(members.len(), i, holders.len())]);
        }
    }
    Ok(out)
}

/// Block `k` of `0..len` cut into `parts` (sizes differing by at most one,
/// the larger first).
fn block(len: usize, parts: usize, k: usize) -> std::ops::Range<usize> {
    let start = k * (len / parts) + k.min(len % parts);
    start..start + len / parts + usize::from(k < len % parts)
}

fn by_groups(
    classes: Vec<Vec<usize>>,
    g: usize,
    nodes: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    let num_classes = classes.len();
    if g > nodes || g > num_classes {
        return Err(PartitionError::TooManyGroups { g, nodes, num_classes });
    }
    let mut out = vec![Vec::new(); nodes];
    for (label, mut members) in classes.into_iter().enumerate() {
        let group = (0..g).find(|k| block(num_classes, g, *k).contains(&label)).unwrap_or(0);
        let holders = block(nodes, g, group);
        members.shuffle(rng);
        for (i, node) in holders.clone().enumerate() {
            out[node].extend_from_slice(&members[text_range(members.len(), i, holders.len())]);
        }
    }
    Ok(out)
}

impl FromStr for Scheme {
    type Err = PartitionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            None if s == "iid" => Ok(Scheme::Iid),
            None if s == "dirichlet" => Err(PartitionError::BadAlpha("no value".into())),
            None if s == "classes" => Err(PartitionError::BadK("no value".into())),
            Some(("dirichlet", a)) => match a.parse::<f64>() {
                Ok(alpha) if alpha > 0.0 && alpha.is_finite() => Ok(Scheme::Dirichlet { alpha }),
                _ => Err(PartitionError::BadAlpha(a.into())),
            },
            Some(("groups", g)) => match g.parse::<usize>() {
                Ok(g) if g >= 1 => Ok(Scheme::Groups { g }),
                _ => Err(PartitionError::BadGroups(g.into())),
            },
            Some(("classes", k)) => match k.parse::<usize>() {
                Ok(k) if k >= 1 => Ok(Scheme::Classes { k }),
                _ => Err(PartitionError::BadK(k.into())),
            },
            _ => Err(PartitionError::Unknown(s.into())),
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scheme::Iid => write!(f, "iid"),
            Scheme::Dirichlet { alpha } => write!(f, "dirichlet:{alpha}"),
            Scheme::Classes { k } => write!(f, "classes:{k}"),
            Scheme::Groups { g } => write!(f, "groups:{g}"),
        }
    }
}

impl serde::Serialize for Scheme {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Scheme {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `n` labels over 10 classes with unequal class sizes.
    fn labels(n: usize) -> Vec<i64> {
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        (0..n).map(|_| (rng.random_range(0..10) * rng.random_range(0..10) % 10) as i64).collect()
    }

    fn schemes() -> Vec<Scheme> {
        [
            "iid",
            "dirichlet:0.05",
            "dirichlet:1",
            "dirichlet:100",
            "classes:1",
            "classes:2",
            "classes:3",
            "classes:12",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
    }

    #[test]
    fn shards_are_disjoint_sorted_and_complete() {
        let labels = labels(997);
        for scheme in schemes() {
            for nodes in [1, 2, 3, 7, 10, 16] {
                for seed in [0, 1, 42] {
                    let result = shards(&labels, 10, &scheme, seed, nodes);
                    if let Scheme::Classes { k } = scheme
                        && nodes * k.min(10) < 10
                    {
                        assert!(
                            matches!(result, Err(PartitionError::UnheldClasses { .. })),
                            "{scheme} {nodes}"
                        );
                        continue;
                    }
                    let out = result.unwrap();
                    assert_eq!(out.len(), nodes);
                    assert!(
                        out.iter().all(|s| s.windows(2).all(|w| w[0] < w[1])),
                        "{scheme} unsorted"
                    );
                    let mut all: Vec<usize> = out.concat();
                    all.sort_unstable();
                    assert_eq!(
                        all,
                        (0..997).collect::<Vec<_>>(),
                        "{scheme} nodes {nodes} seed {seed}"
                    );
                }
            }
        }
    }

    #[test]
    fn deterministic_and_seed_dependent() {
        let labels = labels(500);
        for scheme in schemes() {
            let a = shards(&labels, 10, &scheme, 7, 10).unwrap();
            assert_eq!(a, shards(&labels, 10, &scheme, 7, 10).unwrap(), "{scheme}");
            for node in [0, 4, 9] {
                assert_eq!(shard(&labels, 10, &scheme, 7, node, 10).unwrap(), a[node]);
            }
            if !matches!(scheme, Scheme::Classes { .. }) {
                assert_ne!(a, shards(&labels, 10, &scheme, 8, 10).unwrap(), "{scheme}");
            }
        }
        let iid = shards(&labels, 10, &Scheme::Iid, 7, 10).unwrap();
        assert!(iid.iter().all(|s| s.len() == 50));
    }

    /// Mean over nodes of the total-variation distance between the node's
    /// label histogram and the global one.
    fn mean_skew(labels: &[i64], alpha: f64, seeds: u64) -> f64 {
        let global = [0.1; 10];
        let mut sum = 0.0;
        for seed in 0..seeds {
            let out = shards(labels, 10, &Scheme::Dirichlet { alpha }, seed, 10).unwrap();
            for s in &out {
                let mut hist = [0.0; 10];
                for &i in s {
                    hist[labels[i] as usize] += 1.0 / s.len() as f64;
                }
                sum += 0.5 * hist.iter().zip(global).map(|(h, g)| (h - g).abs()).sum::<f64>();
            }
        }
        sum / (seeds * 10) as f64
    }

    #[test]
    fn dirichlet_skew_grows_as_alpha_falls() {
        let labels: Vec<i64> = (0..6000).map(|i| i % 10).collect();
        let skew: Vec<f64> = [100.0, 1.0, 0.1].iter().map(|&a| mean_skew(&labels, a, 5)).collect();
        assert!(skew[0] < 0.1, "{skew:?}");
        assert!(skew[1] > skew[0] + 0.2 && skew[2] > skew[1] + 0.2, "{skew:?}");
    }

    #[test]
    fn dirichlet_leaves_no_node_empty() {
        let labels = labels(300);
        for seed in 0..5 {
            let out = shards(&labels, 10, &Scheme::Dirichlet { alpha: 0.01 }, seed, 40).unwrap();
            assert!(out.iter().all(|s| !s.is_empty()), "seed {seed}");
        }
    }

    #[test]
    fn classes_k_limits_and_balances_labels() {
        let labels = labels(2000);
        for (k, nodes) in [(1, 10), (2, 5), (2, 8), (3, 10), (4, 3)] {
            let out = shards(&labels, 10, &Scheme::Classes { k }, 3, nodes).unwrap();
            for s in &out {
                let mut seen: Vec<i64> = s.iter().map(|&i| labels[i]).collect();
                seen.sort_unstable();
                seen.dedup();
                assert!(seen.len() <= k, "classes:{k} nodes {nodes}: {seen:?}");
            }
        }
        // With 10 nodes and k = 2, class c is held by nodes c/2 and c/2 + 5,
        // which split it to within one example.
        let out = shards(&labels, 10, &Scheme::Classes { k: 2 }, 3, 10).unwrap();
        for class in 0..10 {
            let counts: Vec<usize> = out
                .iter()
                .map(|s| s.iter().filter(|&&i| labels[i] == class).count())
                .filter(|&c| c > 0)
                .collect();
            assert_eq!(counts.len(), 2, "class {class}: {counts:?}");
            assert!(counts[0].abs_diff(counts[1]) <= 1, "class {class}: {counts:?}");
        }
        let err = shards(&labels, 10, &Scheme::Classes { k: 2 }, 3, 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--partition classes:2 with 4 nodes holds only 8 of the 10 classes; use classes:3 or more, or at least 5 nodes"
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        let labels = vec![0, 1, 2];
        assert_eq!(shards(&labels, 3, &Scheme::Iid, 0, 0), Err(PartitionError::NoNodes));
        assert_eq!(
            shard(&labels, 3, &Scheme::Iid, 0, 3, 3),
            Err(PartitionError::NodeOutOfRange { node: 3, nodes: 3 })
        );
        assert_eq!(
            shards(&[0, 3], 3, &Scheme::Iid, 0, 1),
            Err(PartitionError::BadLabel { index: 1, label: 3, num_classes: 3 })
        );
        assert!(matches!(
            shards(&[-1], 3, &Scheme::Iid, 0, 1),
            Err(PartitionError::BadLabel { .. })
        ));
        assert!(shards(&labels, 3, &Scheme::Dirichlet { alpha: 0.0 }, 0, 2).is_err());
        assert!(shards(&labels, 3, &Scheme::Classes { k: 0 }, 0, 2).is_err());
    }

    #[test]
    fn schemes_parse_print_and_serialize() {
        for s in ["iid", "dirichlet:0.1", "dirichlet:1", "classes:2"] {
            let scheme: Scheme = s.parse().unwrap();
            assert_eq!(scheme.to_string(), s);
            assert_eq!(serde_json::to_string(&scheme).unwrap(), format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<Scheme>(&format!("\"{s}\"")).unwrap(), scheme);
        }
        let err = |s: &str| s.parse::<Scheme>().unwrap_err().to_string();
        assert_eq!(
            err("dirichlet:0"),
            "--partition dirichlet needs alpha > 0 (got 0), e.g. dirichlet:0.5"
        );
        assert!(err("dirichlet:-1").contains("(got -1)"));
        assert!(err("dirichlet:inf").contains("(got inf)"));
        assert!(err("dirichlet").contains("(got no value)"));
        assert!(err("classes:0").contains("k >= 1 (got 0)"));
        assert!(err("classes:x").contains("(got x)"));
        assert!(err("shards:3").contains("unknown --partition scheme \"shards:3\""));
        assert!(err("iid:2").contains("unknown"));
    }

    #[test]
    fn text_ranges_cover_in_order() {
        for (len, nodes) in [(10, 3), (1_115_394, 7), (2, 5), (0, 2)] {
            let ranges: Vec<_> = (0..nodes).map(|n| text_range(len, n, nodes)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[nodes - 1].end, len);
            assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
            assert!(ranges.iter().all(|r| r.len() == len / nodes || r.len() == len / nodes + 1));
        }
        assert_eq!(text_range(10, 3, 3), 0..0);
        assert!(check_text_scheme(&Scheme::Iid).is_ok());
        let err = check_text_scheme(&Scheme::Classes { k: 2 }).unwrap_err().to_string();
        assert!(err.contains("classes:2"), "{err}");
    }

    #[test]
    fn groups_give_each_block_of_nodes_only_its_group_of_classes() {
        let labels: Vec<i64> = (0..600).map(|i| i % 10).collect();
        let parts = shards(&labels, 10, &"groups:3".parse().unwrap(), 1, 12).unwrap();
        // Blocks of nodes 0-3, 4-7, 8-11; groups of classes 0-3, 4-6, 7-9.
        for (node, shard) in parts.iter().enumerate() {
            let held: std::collections::BTreeSet<i64> = shard.iter().map(|&i| labels[i]).collect();
            let want: std::collections::BTreeSet<i64> = match node / 4 {
                0 => (0..4).collect(),
                1 => (4..7).collect(),
                _ => (7..10).collect(),
            };
            assert_eq!(held, want, "node {node}");
        }
        let all: usize = parts.iter().map(Vec::len).sum();
        assert_eq!(all, 600, "every example once");
        assert!(shards(&labels, 10, &Scheme::Groups { g: 13 }, 1, 12).is_err());
    }
}
