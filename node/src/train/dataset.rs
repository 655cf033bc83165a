//! In-memory datasets as plain Rust values, before they become tensors.
//!
//! Loaders (`synthetic`, `idx`, `cifar`, `text`) produce these; `partition`
//! picks a node's shard from them; the trainer turns the shard into tensors.
//! Keeping them tensor-free makes loading and partitioning testable exactly.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Labelled examples for classification. Features are row-major f32, already
/// scaled for training (pixels in [0, 1] then standardised by the loader).
#[derive(Debug, Clone, PartialEq)]
pub struct ClassData {
    /// `len() * sample_shape.iter().product()` values.
    pub features: Vec<f32>,
    /// Shape of one example, e.g. `[1, 28, 28]` for MNIST or `[32]` for synthetic.
    pub sample_shape: Vec<usize>,
    /// One label per example, each `< num_classes`.
    pub labels: Vec<i64>,
    pub num_classes: usize,
}

impl ClassData {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of f32 values in one example.
    pub fn sample_len(&self) -> usize {
        self.sample_shape.iter().product()
    }

    /// The examples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> ClassData {
        let d = self.sample_len();
        let mut features = Vec::with_capacity(indices.len() * d);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            features.extend_from_slice(&self.features[i * d..(i + 1) * d]);
            labels.push(self.labels[i]);
        }
        ClassData {
            features,
            sample_shape: self.sample_shape.clone(),
            labels,
            num_classes: self.num_classes,
        }
    }

    /// Examples `[0, at)` and `[at, len)`. Consumes the data: the head keeps
    /// its buffer and only the tail is copied, so splitting MNIST does not
    /// hold the whole set twice at a node's start.
    pub fn split_at(mut self, at: usize) -> (ClassData, ClassData) {
        let at = at.min(self.len());
        let features = self.features.split_off(at * self.sample_len());
        let labels = self.labels.split_off(at);
        self.features.shrink_to_fit();
        self.labels.shrink_to_fit();
        let tail = ClassData {
            features,
            sample_shape: self.sample_shape.clone(),
            labels,
            num_classes: self.num_classes,
        };
        (self, tail)
    }
}

/// Character-level text: the token stream and the vocabulary it indexes.
#[derive(Debug, Clone, PartialEq)]
pub struct TextData {
    /// Indices into `vocab`.
    pub tokens: Vec<u32>,
    /// Distinct characters, sorted, so that every node derives the same ids.
    pub vocab: Vec<char>,
}

impl TextData {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// A dataset of either kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Dataset {
    Class(ClassData),
    Text(TextData),
}

impl Dataset {
    pub fn len(&self) -> usize {
        match self {
            Dataset::Class(c) => c.len(),
            Dataset::Text(t) => t.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The training data and the held-out data of one run, and how the held-out
/// part was chosen (recorded in `summary.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub train: Dataset,
    pub heldout: Dataset,
    pub holdout: HoldoutNote,
}

/// How the held-out set was chosen.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HoldoutNote {
    /// `"test-split"` when the files carry their own test split, otherwise
    /// `"fraction"` (the last `fraction` of the examples, in file order).
    pub method: String,
    pub fraction: Option<f64>,
    pub train_examples: usize,
    pub heldout_examples: usize,
}

/// Where a run's data comes from: `KIND[:PATH]` on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSpec {
    /// The built-in classification task, generated in code.
    Synthetic,
    /// A directory of MNIST IDX files (gzipped or not).
    Mnist(PathBuf),
    /// A directory of CIFAR-10 binary batches.
    Cifar10(PathBuf),
    /// A UTF-8 text file, modelled character by character.
    Text(PathBuf),
}

/// A `--data` value that could not be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DataSpecError {
    #[error(
        "unknown dataset kind {0:?} in --data (expected synthetic, mnist:DIR, cifar10:DIR or text:FILE)"
    )]
    UnknownKind(String),
    #[error("--data {0} needs a path, e.g. {0}:{1}")]
    MissingPath(&'static str, &'static str),
    #[error("--data synthetic takes no path (got {0:?})")]
    UnexpectedPath(String),
}

impl FromStr for DataSpec {
    type Err = DataSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, path) = match s.split_once(':') {
            Some((k, p)) => (k, Some(p)),
            None => (s, None),
        };
        let path = path.filter(|p| !p.is_empty()).map(PathBuf::from);
        match (kind, path) {
            ("synthetic", None) => Ok(DataSpec::Synthetic),
            ("synthetic", Some(p)) => Err(DataSpecError::UnexpectedPath(p.display().to_string())),
            ("mnist", Some(p)) => Ok(DataSpec::Mnist(p)),
            ("mnist", None) => Err(DataSpecError::MissingPath("mnist", "data/mnist")),
            ("cifar10", Some(p)) => Ok(DataSpec::Cifar10(p)),
            ("cifar10", None) => {
                Err(DataSpecError::MissingPath("cifar10", "data/cifar-10-batches-bin"))
            }
            ("text", Some(p)) => Ok(DataSpec::Text(p)),
            ("text", None) => Err(DataSpecError::MissingPath("text", "data/input.txt")),
            (other, _) => Err(DataSpecError::UnknownKind(other.to_string())),
        }
    }
}

impl fmt::Display for DataSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSpec::Synthetic => write!(f, "synthetic"),
            DataSpec::Mnist(p) => write!(f, "mnist:{}", p.display()),
            DataSpec::Cifar10(p) => write!(f, "cifar10:{}", p.display()),
            DataSpec::Text(p) => write!(f, "text:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_spec_parses_and_rejects() {
        assert_eq!("synthetic".parse::<DataSpec>(), Ok(DataSpec::Synthetic));
        assert_eq!("mnist:/d".parse::<DataSpec>(), Ok(DataSpec::Mnist("/d".into())));
        assert_eq!(
            "imagenet:/d".parse::<DataSpec>(),
            Err(DataSpecError::UnknownKind("imagenet".into()))
        );
        assert!(matches!("mnist".parse::<DataSpec>(), Err(DataSpecError::MissingPath(..))));
        assert!(matches!("synthetic:x".parse::<DataSpec>(), Err(DataSpecError::UnexpectedPath(_))));
    }

    #[test]
    fn select_and_split_keep_rows_together() {
        let c = ClassData {
            features: vec![0.0, 0.1, 1.0, 1.1, 2.0, 2.1],
            sample_shape: vec![2],
            labels: vec![0, 1, 2],
            num_classes: 3,
        };
        let s = c.select(&[2, 0]);
        assert_eq!(s.features, vec![2.0, 2.1, 0.0, 0.1]);
        assert_eq!(s.labels, vec![2, 0]);
        let (a, b) = c.split_at(1);
        assert_eq!((a.labels, a.features), (vec![0], vec![0.0, 0.1]));
        assert_eq!((b.labels, b.features), (vec![1, 2], vec![1.0, 1.1, 2.0, 2.1]));
    }
}
