//! Communication topologies: whom each member talks to in a round, and with
//! what mixing weights.
//!
//! A [`Topology`] is a pure function of (member count `n`, round, seed). The
//! daemon maps the sorted live peer ids to indices `0..n` and rebuilds the
//! topology when membership changes. Every random choice comes from a ChaCha8
//! stream keyed by (seed, round), so every node computes the same graph without
//! talking to anyone. This module owns graph construction and the mixing
//! matrix; it must not touch the network, tensors or peer ids, and its only IO
//! is reading a `file:` edge list once, in [`Topology::new`].
//!
//! Weights: undirected graphs use Metropolis–Hastings,
//! `W_ij = 1 / (1 + max(deg_i, deg_j))` and `W_ii = 1 - sum_j W_ij`, which is
//! symmetric and doubly stochastic on any graph, so plain averaging preserves
//! the mean. `one-peer-exp` is directed: `W_ii = W_{i, i-2^k} = 1/2`, doubly
//! stochastic but not symmetric.
//!
//! A single member (`n = 1`) gets the trivial topology for every spec, without
//! reading any file: it has no one to mix with, so the spec cannot matter.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const EXPECTED: &str = "ring, torus, exponential, regular:D, erdos-renyi:P, \
    barabasi-albert:M, complete, file:PATH, one-peer-exp, regular-per-round:D";
/// Erdős–Rényi graphs drawn before the components of the last one are bridged.
const ER_ATTEMPTS: usize = 16;
/// Random regular graphs drawn before falling back to a circulant graph.
const REGULAR_ATTEMPTS: usize = 100;
/// Reshuffles of the leftover stubs within one random regular draw.
const PAIRING_SHUFFLES: usize = 1000;

/// Why a topology spec could not be parsed or built.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("unknown topology {0:?} (expected {expected})", expected = EXPECTED)]
    Unknown(String),
    #[error("topology {spec:?}: {need}")]
    BadParameter { spec: String, need: &'static str },
    #[error("a topology needs at least one member (got n=0)")]
    NoMembers,
    #[error("{spec} needs n*d even and d < n (got n={n}, d={d})")]
    Regular { spec: String, n: usize, d: usize },
    #[error("regular:1 is a perfect matching, disconnected for n={n} > 2; use d >= 2")]
    Matching { n: usize },
    #[error("barabasi-albert:{m} needs m < n (got n={n}, m={m})")]
    BarabasiAlbert { n: usize, m: usize },
    #[error("cannot read edge list {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("edge list {path}, line {line}: {reason}")]
    Line { path: String, line: usize, reason: String },
}

/// Which graph to build; parsed from and shown as the CLI/config string.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TopologySpec {
    /// `ring`: i ~ i±1. Degree 2 (1 for n = 2).
    Ring,
    /// `torus`: a rows×cols wraparound grid with rows the largest divisor of
    /// n that is <= sqrt(n). Degree 4 when rows, cols >= 3; a side of 2 gives
    /// degree 3. For prime n, rows = 1 and the torus is a ring.
    Torus,
    /// `exponential`: i ~ i ± 2^k mod n for k = 0..=floor(log2(n-1)).
    Exponential,
    /// `regular:D`: a seeded random connected D-regular graph.
    Regular(usize),
    /// `erdos-renyi:P`: seeded G(n, P), made connected (see [`Topology::new`]).
    ErdosRenyi(f64),
    /// `barabasi-albert:M`: seeded preferential attachment, M edges per node.
    BarabasiAlbert(usize),
    /// `complete`: everyone with everyone.
    Complete,
    /// `file:PATH`: an undirected edge list, one `a b` pair per line.
    File(PathBuf),
    /// `one-peer-exp`: in round r node i sends only to i + 2^(r mod ceil(log2 n)).
    OnePeerExp,
    /// `regular-per-round:D`: a fresh random D-regular graph every round
    /// (not necessarily connected in any one round), drawn again on every
    /// call for that round, at O(n*D) cost.
    RegularPerRound(usize),
    /// `rings:C`: C disjoint rings over consecutive members (sizes differ
    /// by at most one), with no edge between them: components that only a
    /// coordinator joins (semi-decentralized training).
    Rings(usize),
}

impl FromStr for TopologySpec {
    type Err = TopologyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (name, arg) = match s.split_once(':') {
            Some((name, arg)) => (name, Some(arg)),
            None => (s, None),
        };
        let bad = |need| TopologyError::BadParameter { spec: s.to_string(), need };
        let count = |need| {
            arg.and_then(|a| a.parse::<usize>().ok()).filter(|&v| v > 0).ok_or_else(|| bad(need))
        };
        match (name, arg) {
            ("ring", None) => Ok(Self::Ring),
            ("torus", None) => Ok(Self::Torus),
            ("exponential", None) => Ok(Self::Exponential),
            ("complete", None) => Ok(Self::Complete),
            ("one-peer-exp", None) => Ok(Self::OnePeerExp),
            ("regular", _) => count("D must be a positive integer").map(Self::Regular),
            ("regular-per-round", _) => {
                count("D must be a positive integer").map(Self::RegularPerRound)
            }
            ("rings", _) => count("C must be a positive integer").map(Self::Rings),
            ("barabasi-albert", _) => {
                count("M must be a positive integer").map(Self::BarabasiAlbert)
            }
            ("erdos-renyi", _) => arg
                .and_then(|a| a.parse::<f64>().ok())
                .filter(|p| (0.0..=1.0).contains(p))
                .map(Self::ErdosRenyi)
                .ok_or_else(|| bad("P must be a probability in [0, 1]")),
            ("file", Some(path)) if !path.is_empty() => Ok(Self::File(path.into())),
            ("file", _) => Err(bad("needs a path, as in file:edges.txt")),
            _ => Err(TopologyError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for TopologySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ring => f.write_str("ring"),
            Self::Torus => f.write_str("torus"),
            Self::Exponential => f.write_str("exponential"),
            Self::Regular(d) => write!(f, "regular:{d}"),
            Self::ErdosRenyi(p) => write!(f, "erdos-renyi:{p}"),
            Self::BarabasiAlbert(m) => write!(f, "barabasi-albert:{m}"),
            Self::Complete => f.write_str("complete"),
            Self::File(path) => write!(f, "file:{}", path.display()),
            Self::OnePeerExp => f.write_str("one-peer-exp"),
            Self::RegularPerRound(d) => write!(f, "regular-per-round:{d}"),
            Self::Rings(c) => write!(f, "rings:{c}"),
        }
    }
}

impl TryFrom<String> for TopologySpec {
    type Error = TopologyError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<TopologySpec> for String {
    fn from(spec: TopologySpec) -> String {
        spec.to_string()
    }
}

/// The topology of one membership: neighbour sets and mixing weights per round.
#[derive(Debug, Clone)]
pub struct Topology {
    n: usize,
    seed: u64,
    shape: Shape,
    family: Arc<Family>,
}

/// The same spec and seed over the member counts asked for lately, shared
/// by every clone. Why: after a membership change every node of the
/// simulator asks for the topology of the new count, and a graph each (an
/// exponential graph over 10,000 members is 2 MB) filled 24 GB before a
/// crash's news had reached them all.
#[derive(Debug)]
struct Family {
    spec: TopologySpec,
    sizes: Mutex<VecDeque<(usize, Shape)>>,
}

/// Member counts kept: one change at a time, a few in flight.
const RECENT_SIZES: usize = 4;

#[derive(Debug, Clone)]
enum Shape {
    /// Shared by every clone: the simulator's nodes hold one graph.
    Static(Arc<Graph>),
    OnePeerExp,
    RegularPerRound(usize, Arc<RecentGraphs>),
}

/// The graphs of the last few rounds of a time-varying topology, shared by
/// every clone. Why: a node asks for its round's graph at every message
/// and mix, drawing one costs O(n), and the simulator's nodes all ask for
/// the same few rounds (a 2,000-node regular-per-round:4 run took 164 s
/// drawing them anew).
#[derive(Debug, Default)]
struct RecentGraphs(Mutex<VecDeque<(u64, Arc<Graph>)>>);

/// Rounds kept: nodes a round or two apart, and a gossip step or two.
const RECENT_ROUNDS: usize = 8;

impl RecentGraphs {
    fn get(&self, round: u64, draw: impl FnOnce() -> Graph) -> Arc<Graph> {
        // A poisoned lock only means a panic elsewhere mid-push: the list
        // is still a list of drawn graphs.
        let mut recent = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, g)) = recent.iter().find(|(r, _)| *r == round) {
            return g.clone();
        }
        let g = Arc::new(draw());
        recent.push_front((round, g.clone()));
        recent.truncate(RECENT_ROUNDS);
        g
    }
}

impl Topology {
    /// Builds the topology of `spec` over members `0..n`. Static graphs are
    /// computed here, and a `file:` edge list is read here.
    ///
    /// `erdos-renyi:P` draws up to 16 graphs and keeps the first connected
    /// one; if all are disconnected, the components of the last draw are
    /// chained by bridge edges between their smallest members, in order.
    /// `barabasi-albert:M` starts from a complete graph on M+1 nodes; each
    /// later node attaches to M distinct earlier nodes picked with probability
    /// proportional to degree. `regular:D` redraws (up to 100 times, then
    /// falls back to a circulant D-regular graph) until the graph is simple
    /// and connected; D = 2 draws a random Hamiltonian cycle directly, and
    /// D > (n-1)/2 draws the sparser complement. Static random graphs use the
    /// stream of (seed, round 0).
    pub fn new(spec: &TopologySpec, n: usize, seed: u64) -> Result<Self, TopologyError> {
        if n == 0 {
            return Err(TopologyError::NoMembers);
        }
        let shape = if n == 1 {
            Shape::Static(Arc::new(Graph::from_edges(1, [])))
        } else {
            match spec {
                TopologySpec::Ring => Shape::Static(Arc::new(circulant(n, &[1]))),
                TopologySpec::Torus => Shape::Static(Arc::new(torus(n))),
                TopologySpec::Exponential => {
                    let max_k = usize::BITS - 1 - (n - 1).leading_zeros();
                    let offsets: Vec<usize> = (0..=max_k).map(|k| 1 << k).collect();
                    Shape::Static(Arc::new(circulant(n, &offsets)))
                }
                TopologySpec::Regular(d) => {
                    check_regular(spec, n, *d)?;
                    if *d == 1 && n > 2 {
                        return Err(TopologyError::Matching { n });
                    }
                    Shape::Static(Arc::new(random_regular(n, *d, true, &mut rng(seed, 0))))
                }
                TopologySpec::ErdosRenyi(p) => {
                    Shape::Static(Arc::new(erdos_renyi(n, *p, &mut rng(seed, 0))))
                }
                TopologySpec::BarabasiAlbert(m) => {
                    if *m >= n {
                        return Err(TopologyError::BarabasiAlbert { n, m: *m });
                    }
                    Shape::Static(Arc::new(barabasi_albert(n, *m, &mut rng(seed, 0))))
                }
                TopologySpec::Complete => Shape::Static(Arc::new(complete(n))),
                TopologySpec::Rings(c) => Shape::Static(Arc::new(rings(n, *c))),
                TopologySpec::File(path) => Shape::Static(Arc::new(read_edge_list(path, n)?)),
                TopologySpec::OnePeerExp => Shape::OnePeerExp,
                TopologySpec::RegularPerRound(d) => {
                    check_regular(spec, n, *d)?;
                    Shape::RegularPerRound(*d, Arc::default())
                }
            }
        };
        let family = Arc::new(Family { spec: spec.clone(), sizes: Mutex::default() });
        Ok(Self { n, seed, shape, family })
    }

    /// What this topology was built from.
    pub fn spec(&self) -> &TopologySpec {
        &self.family.spec
    }

    /// The same spec and seed over `n` members, built once for every clone
    /// that asks (see `Family`).
    pub fn resized(&self, n: usize) -> Result<Topology, TopologyError> {
        if n == self.n {
            return Ok(self.clone());
        }
        let family = self.family.clone();
        // A poisoned lock only means a panic elsewhere mid-push.
        let mut sizes = family.sizes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let shape = match sizes.iter().find(|(m, _)| *m == n) {
            Some((_, shape)) => shape.clone(),
            None => {
                let shape = Topology::new(&family.spec, n, self.seed)?.shape;
                sizes.push_front((n, shape.clone()));
                sizes.truncate(RECENT_SIZES);
                shape
            }
        };
        drop(sizes);
        Ok(Topology { n, seed: self.seed, shape, family })
    }

    /// The number of members.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Whether the graph changes from round to round (never for n = 1).
    pub fn is_time_varying(&self) -> bool {
        !matches!(self.shape, Shape::Static(_))
    }

    /// Whom `i` sends to in `round`: sorted, without `i`. Panics if `i >= n`.
    pub fn out_neighbours(&self, i: usize, round: u64) -> Vec<usize> {
        match self.graph(round) {
            Some(g) => g.adj[i].clone(),
            None => vec![(i + self.hop(round)) % self.n],
        }
    }

    /// Whom `i` receives from in `round`: sorted, without `i`. Panics if `i >= n`.
    pub fn in_neighbours(&self, i: usize, round: u64) -> Vec<usize> {
        match self.graph(round) {
            Some(g) => g.adj[i].clone(),
            None => vec![(i + self.n - self.hop(round)) % self.n],
        }
    }

    /// Whether `j` sends to `i` in `round` (`in_neighbours(i, round)`
    /// contains `j`), without building the list. Panics if `i >= n`.
    pub fn sends_to(&self, j: usize, i: usize, round: u64) -> bool {
        match self.graph(round) {
            Some(g) => g.adj[i].binary_search(&j).is_ok(),
            None => i != j && (i + self.n - self.hop(round)) % self.n == j,
        }
    }

    /// Row `i` of the mixing matrix of `round` as (column, weight), sorted by
    /// column, over `i` and its in-neighbours. Panics if `i >= n`.
    pub fn weights(&self, i: usize, round: u64) -> Vec<(usize, f64)> {
        self.row(self.graph(round).as_deref(), i, round)
    }

    /// The dense n×n mixing matrix of `round`.
    pub fn matrix(&self, round: u64) -> Vec<Vec<f64>> {
        let graph = self.graph(round);
        (0..self.n)
            .map(|i| {
                let mut row = vec![0.0; self.n];
                for (j, w) in self.row(graph.as_deref(), i, round) {
                    row[j] = w;
                }
                row
            })
            .collect()
    }

    /// Whether the graph of `round`, ignoring edge directions, is connected.
    pub fn is_connected(&self, round: u64) -> bool {
        match self.graph(round) {
            Some(g) => g.is_connected(),
            None => {
                let hop = self.hop(round);
                Graph::from_edges(self.n, (0..self.n).map(|i| (i, (i + hop) % self.n)))
                    .is_connected()
            }
        }
    }

    /// The undirected graph of `round`, or `None` for `one-peer-exp`.
    fn graph(&self, round: u64) -> Option<Arc<Graph>> {
        match &self.shape {
            Shape::Static(g) => Some(g.clone()),
            Shape::RegularPerRound(d, recent) => Some(
                recent.get(round, || random_regular(self.n, *d, false, &mut rng(self.seed, round))),
            ),
            Shape::OnePeerExp => None,
        }
    }

    /// The one-peer-exp hop 2^(round mod ceil(log2 n)); needs n >= 2.
    fn hop(&self, round: u64) -> usize {
        let period = u64::from(usize::BITS - (self.n - 1).leading_zeros());
        1 << (round % period)
    }

    fn row(&self, graph: Option<&Graph>, i: usize, round: u64) -> Vec<(usize, f64)> {
        match graph {
            Some(g) => metropolis_row(g, i),
            None => {
                let mut row = vec![(i, 0.5), ((i + self.n - self.hop(round)) % self.n, 0.5)];
                row.sort_by_key(|&(j, _)| j);
                row
            }
        }
    }
}

fn check_regular(spec: &TopologySpec, n: usize, d: usize) -> Result<(), TopologyError> {
    if !(n * d).is_multiple_of(2) || d >= n {
        return Err(TopologyError::Regular { spec: spec.to_string(), n, d });
    }
    Ok(())
}

/// The random stream of (seed, round); distinct pairs give distinct keys.
fn rng(seed: u64, round: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&round.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

fn metropolis_row(g: &Graph, i: usize) -> Vec<(usize, f64)> {
    let deg_i = g.degree(i);
    let mut row: Vec<(usize, f64)> =
        g.adj[i].iter().map(|&j| (j, 1.0 / (1 + deg_i.max(g.degree(j))) as f64)).collect();
    let own = 1.0 - row.iter().map(|&(_, w)| w).sum::<f64>();
    row.insert(row.partition_point(|&(j, _)| j < i), (i, own));
    row
}

/// An undirected simple graph as sorted adjacency lists.
#[derive(Debug, Clone)]
struct Graph {
    adj: Vec<Vec<usize>>,
}

impl Graph {
    /// Drops self loops and duplicate edges.
    fn from_edges(n: usize, edges: impl IntoIterator<Item = (usize, usize)>) -> Self {
        let mut sets = vec![BTreeSet::new(); n];
        for (a, b) in edges {
            if a != b {
                sets[a].insert(b);
                sets[b].insert(a);
            }
        }
        Self { adj: sets.into_iter().map(|s| s.into_iter().collect()).collect() }
    }

    fn degree(&self, i: usize) -> usize {
        self.adj[i].len()
    }

    fn edges(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.adj
            .iter()
            .enumerate()
            .flat_map(|(i, adj)| adj.iter().filter(move |&&j| i < j).map(move |&j| (i, j)))
    }

    /// Connected components, each sorted, ordered by their smallest member.
    fn components(&self) -> Vec<Vec<usize>> {
        let mut seen = vec![false; self.adj.len()];
        let mut components = Vec::new();
        for start in 0..self.adj.len() {
            if seen[start] {
                continue;
            }
            seen[start] = true;
            let (mut component, mut queue) = (Vec::new(), VecDeque::from([start]));
            while let Some(v) = queue.pop_front() {
                component.push(v);
                for &u in &self.adj[v] {
                    if !std::mem::replace(&mut seen[u], true) {
                        queue.push_back(u);
                    }
                }
            }
            component.sort_unstable();
            components.push(component);
        }
        components
    }

    fn is_connected(&self) -> bool {
        self.components().len() <= 1
    }

    fn complement(&self) -> Self {
        let n = self.adj.len();
        let pairs = (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j)));
        Self::from_edges(n, pairs.filter(|&(i, j)| self.adj[i].binary_search(&j).is_err()))
    }
}

/// i ~ i + o mod n for every offset o (and so i ~ i - o).
fn circulant(n: usize, offsets: &[usize]) -> Graph {
    Graph::from_edges(n, (0..n).flat_map(|i| offsets.iter().map(move |o| (i, (i + o) % n))))
}

fn complete(n: usize) -> Graph {
    Graph::from_edges(n, (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j))))
}

fn torus(n: usize) -> Graph {
    let rows =
        (1..=n).take_while(|r| r * r <= n).filter(|&r| n.is_multiple_of(r)).max().unwrap_or(1);
    let cols = n / rows;
    let at = |r: usize, c: usize| (r % rows) * cols + c % cols;
    let edges =
        (0..rows).flat_map(|r| (0..cols).flat_map(move |c| [(r, c, r + 1, c), (r, c, r, c + 1)]));
    Graph::from_edges(n, edges.map(|(r, c, r2, c2)| (at(r, c), at(r2, c2))))
}

/// `c` rings over consecutive blocks of `0..n` (a block of 2 is one edge,
/// of 1 an isolated member); more rings than members gives each its own.
fn rings(n: usize, c: usize) -> Graph {
    let c = c.clamp(1, n);
    let mut edges = Vec::new();
    let mut start = 0;
    for k in 0..c {
        let size = n / c + usize::from(k < n % c);
        let block: Vec<usize> = (start..start + size).collect();
        match size {
            0 | 1 => {}
            2 => edges.push((block[0], block[1])),
            _ => edges.extend((0..size).map(|i| (block[i], block[(i + 1) % size]))),
        }
        start += size;
    }
    Graph::from_edges(n, edges)
}

/// A random d-regular graph (n*d even, d < n), connected if asked.
fn random_regular(n: usize, d: usize, connected: bool, rng: &mut ChaCha8Rng) -> Graph {
    if connected && d == 2 {
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(rng);
        return Graph::from_edges(n, (0..n).map(|k| (order[k], order[(k + 1) % n])));
    }
    // Dense graphs are the complements of sparse ones, which pair easily.
    let flip = 2 * d > n - 1;
    let k = if flip { n - 1 - d } else { d };
    for _ in 0..REGULAR_ATTEMPTS {
        if let Some(g) = pairing(n, k, rng) {
            let g = if flip { g.complement() } else { g };
            if !connected || g.is_connected() {
                return g;
            }
        }
    }
    // Practically unreachable; a circulant d-regular graph keeps the promise.
    let mut offsets: Vec<usize> = (1..=d / 2).collect();
    if !d.is_multiple_of(2) {
        offsets.push(n / 2);
    }
    circulant(n, &offsets)
}

/// One try of the pairing model with incremental repair (as in networkx's
/// `random_regular_graph`): pair shuffled stubs, keep the pairs that make
/// simple edges, reshuffle the rest; `None` when the rest cannot be paired.
fn pairing(n: usize, k: usize, rng: &mut ChaCha8Rng) -> Option<Graph> {
    let mut edges = BTreeSet::new();
    let mut stubs: Vec<usize> = (0..n).flat_map(|i| std::iter::repeat_n(i, k)).collect();
    for _ in 0..PAIRING_SHUFFLES {
        if stubs.is_empty() {
            return Some(Graph::from_edges(n, edges));
        }
        stubs.shuffle(rng);
        let mut left = Vec::new();
        for pair in stubs.chunks_exact(2) {
            let (a, b) = (pair[0].min(pair[1]), pair[0].max(pair[1]));
            if a == b || !edges.insert((a, b)) {
                left.extend([a, b]);
            }
        }
        let nodes: Vec<usize> = left.iter().copied().collect::<BTreeSet<_>>().into_iter().collect();
        let pairable = nodes
            .iter()
            .enumerate()
            .any(|(x, &a)| nodes[x + 1..].iter().any(|&b| !edges.contains(&(a, b))));
        if !left.is_empty() && !pairable {
            return None;
        }
        stubs = left;
    }
    None
}

fn erdos_renyi(n: usize, p: f64, rng: &mut ChaCha8Rng) -> Graph {
    let mut g = Graph::from_edges(n, []);
    for _ in 0..ER_ATTEMPTS {
        let pairs = (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j)));
        g = Graph::from_edges(n, pairs.filter(|_| rng.random_bool(p)));
        if g.is_connected() {
            return g;
        }
    }
    let bridges: Vec<(usize, usize)> =
        g.components().windows(2).map(|pair| (pair[0][0], pair[1][0])).collect();
    Graph::from_edges(n, g.edges().chain(bridges))
}

fn barabasi_albert(n: usize, m: usize, rng: &mut ChaCha8Rng) -> Graph {
    let mut edges: Vec<(usize, usize)> =
        (0..=m).flat_map(|i| (i + 1..=m).map(move |j| (i, j))).collect();
    // Every node appears once per incident edge: uniform picks from it are
    // picks proportional to degree.
    let mut ends: Vec<usize> = edges.iter().flat_map(|&(a, b)| [a, b]).collect();
    for v in m + 1..n {
        let mut targets = BTreeSet::new();
        while targets.len() < m {
            targets.insert(ends[rng.random_range(0..ends.len())]);
        }
        for t in targets {
            edges.push((t, v));
            ends.extend([t, v]);
        }
    }
    Graph::from_edges(n, edges)
}

fn read_edge_list(path: &Path, n: usize) -> Result<Graph, TopologyError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|source| TopologyError::Read { path: shown.clone(), source })?;
    let mut edges = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let content = line.split('#').next().unwrap_or_default().trim();
        if content.is_empty() {
            continue;
        }
        let err =
            |reason: String| TopologyError::Line { path: shown.clone(), line: index + 1, reason };
        let fields: Vec<&str> = content.split_whitespace().collect();
        let [a, b] = fields[..] else {
            return Err(err(format!("expected two node indices \"a b\", got {content:?}")));
        };
        let node =
            |s: &str| s.parse::<usize>().map_err(|_| err(format!("{s:?} is not a node index")));
        let (a, b) = (node(a)?, node(b)?);
        if a.max(b) >= n {
            return Err(err(format!("node {} is out of range for n={n} members", a.max(b))));
        }
        if a == b {
            return Err(err(format!("self loop {a} {b}")));
        }
        edges.push((a, b));
    }
    Ok(Graph::from_edges(n, edges))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resized_topology_is_built_once_for_every_clone_and_equals_a_new_one() {
        for spec in ["exponential", "regular:3", "one-peer-exp"] {
            let spec: TopologySpec = spec.parse().unwrap();
            let t = Topology::new(&spec, 64, 7).unwrap();
            let (a, b) = (t.clone().resized(62).unwrap(), t.resized(62).unwrap());
            if let (Shape::Static(ga), Shape::Static(gb)) = (&a.shape, &b.shape) {
                assert!(Arc::ptr_eq(ga, gb), "{spec}: one graph for both");
            }
            let fresh = Topology::new(&spec, 62, 7).unwrap();
            for round in 0..3 {
                assert_eq!(a.matrix(round), fresh.matrix(round), "{spec} round {round}");
            }
            assert_eq!((a.n(), a.spec()), (62, &spec));
        }
    }

    const STATIC: [&str; 8] = [
        "ring",
        "torus",
        "exponential",
        "regular:3",
        "regular:4",
        "erdos-renyi:0.3",
        "barabasi-albert:2",
        "complete",
    ];

    fn build(spec: &str, n: usize, seed: u64) -> Result<Topology, TopologyError> {
        Topology::new(&spec.parse().unwrap(), n, seed)
    }

    #[test]
    fn a_rounds_graph_is_drawn_once_for_every_clone_and_again_the_same_later() {
        let t = build("regular-per-round:4", 50, 9).unwrap();
        let clone = t.clone();
        let first: Vec<Vec<usize>> = (0..50).map(|i| t.out_neighbours(i, 0)).collect();
        assert!(Arc::ptr_eq(&t.graph(0).unwrap(), &clone.graph(0).unwrap()), "drawn twice");
        // Past the rounds kept, round 0 is drawn again from its own stream.
        for round in 1..=RECENT_ROUNDS as u64 + 2 {
            clone.graph(round);
        }
        let again: Vec<Vec<usize>> = (0..50).map(|i| t.out_neighbours(i, 0)).collect();
        assert_eq!(first, again);
        assert_ne!(first, (0..50).map(|i| t.out_neighbours(i, 1)).collect::<Vec<_>>());
    }

    #[test]
    fn sends_to_agrees_with_the_in_neighbour_lists() {
        let specs = ["ring", "exponential", "one-peer-exp", "regular-per-round:2", "torus"];
        for spec in specs.into_iter().chain(STATIC) {
            for n in [1, 2, 7, 16] {
                let Ok(t) = build(spec, n, 3) else { continue };
                for (round, i, j) in
                    (0..5).flat_map(|r| (0..n).flat_map(move |i| (0..n).map(move |j| (r, i, j))))
                {
                    let listed = t.in_neighbours(i, round).contains(&j);
                    assert_eq!(
                        t.sends_to(j, i, round),
                        listed,
                        "{spec} n={n} round {round}: {j} -> {i}"
                    );
                }
            }
        }
    }

    fn assert_doubly_stochastic(w: &[Vec<f64>], what: &str) {
        let n = w.len();
        for i in 0..n {
            let row: f64 = w[i].iter().sum();
            let col: f64 = w.iter().map(|r| r[i]).sum();
            assert!((row - 1.0).abs() < 1e-12 && (col - 1.0).abs() < 1e-12, "{what}: row/col {i}");
            assert!(w[i].iter().all(|&x| x >= 0.0), "{what}: negative weight in row {i}");
        }
    }

    fn random_vectors(n: usize, dim: usize, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect()).collect()
    }

    /// One step of x <- W x, using only the sparse rows a node would use.
    fn mix(t: &Topology, x: &[Vec<f64>], round: u64) -> Vec<Vec<f64>> {
        (0..x.len())
            .map(|i| {
                let mut out = vec![0.0; x[i].len()];
                for (j, w) in t.weights(i, round) {
                    out.iter_mut().zip(&x[j]).for_each(|(o, v)| *o += w * v);
                }
                out
            })
            .collect()
    }

    fn max_deviation_from(x: &[Vec<f64>], mean: &[f64]) -> f64 {
        x.iter().flat_map(|v| v.iter().zip(mean).map(|(a, b)| (a - b).abs())).fold(0.0, f64::max)
    }

    fn mean(x: &[Vec<f64>]) -> Vec<f64> {
        let n = x.len() as f64;
        (0..x[0].len()).map(|k| x.iter().map(|v| v[k]).sum::<f64>() / n).collect()
    }

    #[test]
    fn static_specs_are_symmetric_doubly_stochastic_and_connected() {
        for spec in STATIC {
            for n in [2, 5, 8, 16, 33] {
                for seed in [0, 1, 7] {
                    let what = format!("{spec} n={n} seed={seed}");
                    let valid = match spec.parse().unwrap() {
                        TopologySpec::Regular(d) => (n * d).is_multiple_of(2) && d < n,
                        TopologySpec::BarabasiAlbert(m) => m < n,
                        _ => true,
                    };
                    let t = match build(spec, n, seed) {
                        Ok(t) => t,
                        Err(e) if !valid => {
                            assert!(e.to_string().contains(spec), "{what}: {e}");
                            continue;
                        }
                        Err(e) => panic!("{what}: {e}"),
                    };
                    assert!(valid, "{what} should have been refused");
                    assert!(!t.is_time_varying() && t.is_connected(0), "{what}");
                    let w = t.matrix(0);
                    assert_doubly_stochastic(&w, &what);
                    assert_eq!(w, t.matrix(9), "{what}: static graph changed");
                    for (i, row) in w.iter().enumerate() {
                        let adj = t.out_neighbours(i, 0);
                        assert_eq!(adj, t.in_neighbours(i, 0), "{what}");
                        assert!(adj.windows(2).all(|p| p[0] < p[1]) && !adj.contains(&i));
                        for (j, &wij) in row.iter().enumerate() {
                            assert_eq!(wij, w[j][i], "{what}: W[{i}][{j}]");
                            assert_eq!(wij > 0.0, i == j || adj.contains(&j), "{what}");
                        }
                        let degree = match spec {
                            "ring" => Some(2.min(n - 1)),
                            "regular:3" => Some(3),
                            "regular:4" => Some(4),
                            "complete" => Some(n - 1),
                            _ => None,
                        };
                        if let Some(degree) = degree {
                            assert_eq!(adj.len(), degree, "{what}: degree of {i}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn shapes_have_the_documented_degrees_and_edges() {
        let degrees = |spec: &str, n: usize| -> Vec<usize> {
            let t = build(spec, n, 3).unwrap();
            (0..n).map(|i| t.out_neighbours(i, 0).len()).collect()
        };
        assert_eq!(degrees("torus", 16), vec![4; 16]); // 4x4
        assert_eq!(degrees("torus", 33), vec![4; 33]); // 3x11
        assert_eq!(degrees("torus", 8), vec![3; 8]); // 2x4: up and down coincide
        assert_eq!(degrees("torus", 5), vec![2; 5]); // prime: a ring
        assert_eq!(degrees("exponential", 16), vec![7; 16]); // ±1, ±2, ±4, 8
        assert_eq!(build("exponential", 8, 0).unwrap().out_neighbours(0, 0), [1, 2, 4, 6, 7]);
        assert_eq!(build("torus", 16, 0).unwrap().out_neighbours(5, 0), [1, 4, 6, 9]);
        // barabasi-albert:2 on 33 nodes: a triangle, then 2 edges per node.
        assert_eq!(degrees("barabasi-albert:2", 33).iter().sum::<usize>(), 2 * (3 + 2 * 30));
        assert!(degrees("barabasi-albert:2", 33).iter().all(|&d| d >= 2));
        // p = 0 never connects: the isolated nodes are bridged into a path.
        let path = build("erdos-renyi:0", 8, 0).unwrap();
        assert_eq!(path.out_neighbours(0, 0), [1]);
        assert_eq!(path.out_neighbours(3, 0), [2, 4]);
        assert!(path.is_connected(0));
        // Same seed, same graph; another seed, another graph.
        assert_eq!(
            build("regular:3", 16, 1).unwrap().matrix(0),
            build("regular:3", 16, 1).unwrap().matrix(0)
        );
        assert_ne!(
            build("regular:3", 16, 1).unwrap().matrix(0),
            build("regular:3", 16, 2).unwrap().matrix(0)
        );
        // The dense side goes through the complement.
        assert_eq!(degrees("regular:13", 16), vec![13; 16]);
        assert_eq!(degrees("regular:2", 33), vec![2; 33]);
    }

    #[test]
    fn averaging_on_every_static_topology_converges_to_the_mean() {
        // 64 nodes, 3 values each in [-1, 1], seeds 0..4: max deviation < 1e-6
        // after these rounds. They hold with margin; the ring's second
        // eigenvalue 1/3 + 2/3 cos(2 pi / 64) ~ 0.9968 makes it need ~3600.
        let cases = [
            ("ring", 4000),
            ("torus", 120),
            ("exponential", 40),
            ("regular:3", 400),
            ("regular:4", 150),
            ("erdos-renyi:0.1", 400),
            ("barabasi-albert:2", 400),
            ("complete", 1),
        ];
        let x0 = random_vectors(64, 3, 42);
        let target = mean(&x0);
        for (spec, rounds) in cases {
            for seed in 0..4 {
                let t = build(spec, 64, seed).unwrap();
                let mut x = x0.clone();
                for round in 0..rounds {
                    x = mix(&t, &x, round);
                }
                let deviation = max_deviation_from(&x, &target);
                assert!(deviation < 1e-6, "{spec} seed {seed}: {deviation} after {rounds} rounds");
            }
        }
    }

    #[test]
    fn one_peer_exp_reaches_the_exact_average_in_log2_n_rounds() {
        for n in [2, 4, 8, 16, 64] {
            let t = build("one-peer-exp", n, 0).unwrap();
            assert!(t.is_time_varying());
            let period = n.trailing_zeros() as u64;
            for start in [0, 5] {
                let x0 = random_vectors(n, 2, n as u64);
                let mut x = x0.clone();
                for round in start..start + period {
                    let w = t.matrix(round);
                    assert_doubly_stochastic(&w, &format!("one-peer-exp n={n} round {round}"));
                    x = mix(&t, &x, round);
                }
                let deviation = max_deviation_from(&x, &mean(&x0));
                assert!(deviation < 1e-12, "n={n}: deviation {deviation}");
            }
        }
        let t = build("one-peer-exp", 8, 0).unwrap();
        // Rounds cycle through hops 1, 2, 4.
        assert_eq!(t.out_neighbours(3, 0), [4]);
        assert_eq!(t.out_neighbours(3, 1), [5]);
        assert_eq!(t.out_neighbours(3, 2), [7]);
        assert_eq!(t.out_neighbours(3, 3), [4]);
        assert_eq!(t.in_neighbours(3, 2), [7]);
        assert_eq!(t.in_neighbours(1, 1), [7]);
        assert_eq!(t.weights(1, 1), [(1, 0.5), (7, 0.5)]);
        assert!(t.is_connected(0) && !t.is_connected(1));
        // Not a power of two: still doubly stochastic, hops 1, 2, 4 mod 5.
        let t = build("one-peer-exp", 5, 0).unwrap();
        for round in 0..3 {
            assert_doubly_stochastic(&t.matrix(round), "one-peer-exp n=5");
        }
        assert_eq!(t.out_neighbours(2, 2), [1]);
    }

    #[test]
    fn regular_per_round_is_fresh_regular_and_doubly_stochastic_each_round() {
        let t = build("regular-per-round:3", 16, 9).unwrap();
        assert!(t.is_time_varying());
        let matrices: Vec<_> = (0..10).map(|r| t.matrix(r)).collect();
        for (round, w) in matrices.iter().enumerate() {
            assert_doubly_stochastic(w, &format!("round {round}"));
            for (i, row) in w.iter().enumerate() {
                assert_eq!(t.out_neighbours(i, round as u64).len(), 3, "round {round}");
                assert_eq!(row[i], 1.0 - 3.0 / 4.0);
            }
        }
        assert!(matrices.windows(2).all(|p| p[0] != p[1]), "the graph must change each round");
        assert_eq!(matrices[4], build("regular-per-round:3", 16, 9).unwrap().matrix(4));
        assert_ne!(matrices[4], build("regular-per-round:3", 16, 10).unwrap().matrix(4));
    }

    #[test]
    fn one_and_two_members_work_for_every_spec() {
        let all = STATIC.iter().copied().chain([
            "file:/no/such/file",
            "one-peer-exp",
            "regular-per-round:1",
        ]);
        for spec in all {
            let t = build(spec, 1, 0).unwrap();
            assert_eq!(t.matrix(3), [[1.0]], "{spec}");
            assert!(t.out_neighbours(0, 3).is_empty() && t.in_neighbours(0, 3).is_empty());
            assert!(t.is_connected(3));
        }
        for spec in [
            "ring",
            "torus",
            "exponential",
            "regular:1",
            "erdos-renyi:0.5",
            "barabasi-albert:1",
            "complete",
            "one-peer-exp",
            "regular-per-round:1",
        ] {
            let t = build(spec, 2, 0).unwrap();
            for round in 0..3 {
                assert_eq!(t.matrix(round), [[0.5, 0.5], [0.5, 0.5]], "{spec}");
                assert_eq!(t.out_neighbours(0, round), [1], "{spec}");
            }
        }
    }

    #[test]
    fn specs_round_trip_through_strings_and_serde() {
        for s in STATIC.iter().copied().chain([
            "erdos-renyi:0.25",
            "file:/tmp/edges.txt",
            "one-peer-exp",
            "regular-per-round:4",
        ]) {
            let spec: TopologySpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<TopologySpec>(&json).unwrap(), spec);
        }
        assert_eq!(
            "file:C:/a b.txt".parse::<TopologySpec>().unwrap(),
            TopologySpec::File("C:/a b.txt".into())
        );
        assert!(
            serde_json::from_str::<TopologySpec>("\"star\"")
                .unwrap_err()
                .to_string()
                .contains("star")
        );
    }

    #[test]
    fn errors_name_the_bad_value() {
        let parse_err = |s: &str| s.parse::<TopologySpec>().unwrap_err().to_string();
        assert_eq!(parse_err("star"), format!("unknown topology \"star\" (expected {EXPECTED})"));
        assert!(parse_err("ring:3").contains("ring:3"));
        for s in [
            "regular:0",
            "regular:x",
            "regular",
            "erdos-renyi:1.5",
            "erdos-renyi:NaN",
            "barabasi-albert:-1",
            "regular-per-round:",
            "file:",
        ] {
            assert!(parse_err(s).contains(&format!("\"{s}\"")), "{s}: {}", parse_err(s));
        }
        let build_err = |s: &str, n| build(s, n, 0).unwrap_err().to_string();
        assert_eq!(build_err("regular:5", 7), "regular:5 needs n*d even and d < n (got n=7, d=5)");
        assert_eq!(
            build_err("regular-per-round:4", 4),
            "regular-per-round:4 needs n*d even and d < n (got n=4, d=4)"
        );
        assert!(build_err("regular:1", 6).contains("n=6"));
        assert_eq!(
            build_err("barabasi-albert:5", 4),
            "barabasi-albert:5 needs m < n (got n=4, m=5)"
        );
        assert!(build_err("ring", 0).contains("n=0"));
    }

    #[test]
    fn edge_list_files_parse_with_comments_and_report_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            TopologySpec::File(path)
        };
        let square =
            write("square.txt", "# a 4-cycle\n0 1\n1 2  # trailing comment\n\n2 3\n3 0\n1 0\n");
        let t = Topology::new(&square, 4, 0).unwrap();
        assert_eq!(t.matrix(0), Topology::new(&TopologySpec::Ring, 4, 0).unwrap().matrix(0));
        let cases = [
            ("0 1\n1 x\n", "line 2: \"x\" is not a node index"),
            ("# header\n0 9\n", "line 2: node 9 is out of range for n=4 members"),
            ("2 2\n", "line 1: self loop 2 2"),
            ("0 1\n\n1 2 3\n", "line 3: expected two node indices \"a b\", got \"1 2 3\""),
        ];
        for (text, message) in cases {
            let err = Topology::new(&write("bad.txt", text), 4, 0).unwrap_err().to_string();
            assert!(err.contains("bad.txt") && err.ends_with(message), "{err}");
        }
        let missing = Topology::new(&"file:/no/such/edges".parse().unwrap(), 4, 0).unwrap_err();
        assert!(missing.to_string().contains("/no/such/edges"), "{missing}");
    }

    #[test]
    fn rings_are_disjoint_components_with_no_edge_between() {
        let t = Topology::new(&"rings:3".parse().unwrap(), 12, 0).unwrap();
        assert!(!t.is_connected(0));
        for i in 0..12 {
            let block = i / 4;
            let n = t.out_neighbours(i, 0);
            assert_eq!(n.len(), 2, "a ring of 4: {i} -> {n:?}");
            assert!(n.iter().all(|j| j / 4 == block), "{i} -> {n:?} leaves its ring");
        }
        assert_eq!("rings:3".parse::<TopologySpec>().unwrap().to_string(), "rings:3");
        assert!("rings:0".parse::<TopologySpec>().is_err());
        let uneven = Topology::new(&TopologySpec::Rings(3), 7, 0).unwrap();
        assert_eq!(uneven.out_neighbours(6, 0), vec![5], "a block of 2 is one edge");
    }
}
