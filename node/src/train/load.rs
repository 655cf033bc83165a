//! From a `--data` spec and `--holdout` to the run's `Split`: which loader
//! reads the data, and which part of it is held out for evaluation.
//!
//! Owns the holdout rules and `DataError`, the one error the rest of murmur
//! sees from data loading. Parsing the files is the loaders' job; choosing a
//! node's shard of the training part is `partition`'s.

use std::path::Path;

use super::dataset::{ClassData, DataSpec, Dataset, HoldoutNote, Split, TextData};
use super::{cifar, idx, synthetic, text};

/// The train and test splits that a directory of labelled files carries.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledSplits {
    pub train: Option<ClassData>,
    pub test: Option<ClassData>,
}

/// Why a run's data could not be loaded or split.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("--holdout must be in (0, 1) (got {0})")]
    Holdout(f64),
    #[error(
        "--holdout {fraction} of the {len} {unit} of --data {spec} leaves no {part}; use more data or another --holdout"
    )]
    EmptyPart { spec: String, len: usize, unit: &'static str, fraction: f64, part: &'static str },
    #[error(transparent)]
    Idx(#[from] idx::IdxError),
    #[error(transparent)]
    Cifar(#[from] cifar::CifarError),
    #[error(transparent)]
    Text(#[from] text::TextError),
}

/// The held-out fraction used when `--holdout` is not given: 0.1 for text
/// (Tiny Shakespeare convention), 0.2 otherwise.
pub fn default_holdout(spec: &DataSpec) -> f64 {
    match spec {
        DataSpec::Text(_) => 0.1,
        _ => 0.2,
    }
}

/// Loads the data of `spec` and splits it into training and held-out parts.
///
/// Files that carry both a train and a test split use them as they are (and
/// ignore `holdout`); otherwise the last `holdout` fraction, in file order,
/// is held out (`default_holdout` when `None`).
pub fn load(spec: &DataSpec, holdout: Option<f64>) -> Result<Split, DataError> {
    if let Some(h) = holdout
        && !(h > 0.0 && h < 1.0)
    {
        return Err(DataError::Holdout(h));
    }
    let fraction = holdout.unwrap_or_else(|| default_holdout(spec));
    match spec {
        DataSpec::Synthetic => {
            let data = synthetic::generate(synthetic::DEFAULT_SEED, synthetic::DEFAULT_SAMPLES);
            split_tail(spec, data, fraction)
        }
        DataSpec::Mnist(dir) => split_labelled(spec, idx::load_mnist_dir(dir)?, holdout, fraction),
        DataSpec::Cifar10(dir) => {
            split_labelled(spec, cifar::load_cifar10_dir(dir)?, holdout, fraction)
        }
        DataSpec::Text(path) => split_text(spec, text::load_text(path)?, fraction),
    }
}

fn split_labelled(
    spec: &DataSpec,
    splits: LabelledSplits,
    explicit: Option<f64>,
    fraction: f64,
) -> Result<Split, DataError> {
    match (splits.train, splits.test) {
        (Some(train), Some(test)) => {
            if let Some(h) = explicit {
                tracing::warn!(data = %spec, holdout = h, "the data carries its own test split; ignoring --holdout");
            }
            let holdout = HoldoutNote {
                method: "test-split".into(),
                fraction: None,
                train_examples: train.len(),
                heldout_examples: test.len(),
            };
            Ok(Split { train: Dataset::Class(train), heldout: Dataset::Class(test), holdout })
        }
        (Some(one), None) | (None, Some(one)) => split_tail(spec, one, fraction),
        // The loaders refuse a directory with neither split; an empty one
        // still gets a clear message rather than a panic.
        (None, None) => Err(DataError::EmptyPart {
            spec: spec.to_string(),
            len: 0,
            unit: "examples",
            fraction,
            part: "training examples",
        }),
    }
}

fn split_tail(spec: &DataSpec, data: ClassData, fraction: f64) -> Result<Split, DataError> {
    let at = cut(spec, data.len(), fraction, "examples")?;
    let (train, heldout) = data.split_at(at);
    Ok(Split {
        holdout: fraction_note(fraction, train.len(), heldout.len()),
        train: Dataset::Class(train),
        heldout: Dataset::Class(heldout),
    })
}

fn split_text(spec: &DataSpec, data: TextData, fraction: f64) -> Result<Split, DataError> {
    let at = cut(spec, data.len(), fraction, "characters")?;
    let train = TextData { tokens: data.tokens[..at].to_vec(), vocab: data.vocab.clone() };
    let heldout = TextData { tokens: data.tokens[at..].to_vec(), vocab: data.vocab };
    Ok(Split {
        holdout: fraction_note(fraction, train.len(), heldout.len()),
        train: Dataset::Text(train),
        heldout: Dataset::Text(heldout),
    })
}

/// Where the held-out tail starts: `len - round(len * fraction)`, with both
/// parts non-empty.
fn cut(spec: &DataSpec, len: usize, fraction: f64, unit: &'static str) -> Result<usize, DataError> {
    let held = (len as f64 * fraction).round() as usize;
    let empty = |part| DataError::EmptyPart { spec: spec.to_string(), len, unit, fraction, part };
    if held == 0 {
        return Err(empty("held-out part"));
    }
    if held >= len {
        return Err(empty("training part"));
    }
    Ok(len - held)
}

fn fraction_note(fraction: f64, train_examples: usize, heldout_examples: usize) -> HoldoutNote {
    HoldoutNote {
        method: "fraction".into(),
        fraction: Some(fraction),
        train_examples,
        heldout_examples,
    }
}

/// The first few entries of `dir`, sorted, for error messages that must say
/// what was found instead of what was expected.
pub(crate) fn describe_dir(dir: &Path) -> String {
    const SHOWN: usize = 8;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return "(unreadable)".into();
    };
    let mut names: Vec<String> =
        entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    if names.is_empty() {
        return "nothing".into();
    }
    names.sort();
    let more = names.len().saturating_sub(SHOWN);
    names.truncate(SHOWN);
    let mut listed = names.join(", ");
    if more > 0 {
        listed.push_str(&format!(" and {more} more"));
    }
    listed
}

/// The folder of real test data: `MURMUR_DATA_DIR`, else `../../shared/data`
/// next to this crate. Panics with a clear message when neither exists, so a
/// test that needs real data can never pass without it.
#[cfg(test)]
pub(crate) fn test_data_dir() -> std::path::PathBuf {
    let dir = match std::env::var_os("MURMUR_DATA_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"),
    };
    assert!(
        dir.is_dir(),
        "this test needs the real data folder: set MURMUR_DATA_DIR (tried {})",
        dir.display()
    );
    dir
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::train::idx::write_idx;

    fn class(d: &Dataset) -> &ClassData {
        match d {
            Dataset::Class(c) => c,
            Dataset::Text(_) => panic!("expected class data"),
        }
    }

    #[test]
    fn holdout_is_validated() {
        for bad in [0.0, 1.0, 1.5, -0.1, f64::NAN] {
            let err = load(&DataSpec::Synthetic, Some(bad)).unwrap_err();
            assert!(matches!(err, DataError::Holdout(_)), "{bad}");
        }
        let err = load(&DataSpec::Synthetic, Some(1.5)).unwrap_err();
        assert_eq!(err.to_string(), "--holdout must be in (0, 1) (got 1.5)");
        let err = load(&DataSpec::Synthetic, Some(1e-6)).unwrap_err().to_string();
        assert!(err.contains("leaves no held-out part") && err.contains("10000"), "{err}");
    }

    #[test]
    fn synthetic_holds_out_the_tail() {
        let s = load(&DataSpec::Synthetic, None).unwrap();
        let full = synthetic::generate(synthetic::DEFAULT_SEED, synthetic::DEFAULT_SAMPLES);
        let (train, held) = full.split_at(8000);
        assert_eq!(class(&s.train), &train);
        assert_eq!(class(&s.heldout), &held);
        assert_eq!(s.holdout, fraction_note(0.2, 8000, 2000));
        let s = load(&DataSpec::Synthetic, Some(0.25)).unwrap();
        assert_eq!((s.train.len(), s.heldout.len()), (7500, 2500));
    }

    #[test]
    fn files_with_a_test_split_use_it_and_ignore_holdout() {
        let dir = tempfile::tempdir().unwrap();
        for (prefix, n) in [("train", 30), ("t10k", 7)] {
            write_idx(
                &dir.path().join(format!("{prefix}-images-idx3-ubyte")),
                &[n, 2, 2],
                &vec![3; n * 4],
                false,
            );
            write_idx(
                &dir.path().join(format!("{prefix}-labels-idx1-ubyte.gz")),
                &[n],
                &vec![1; n],
                true,
            );
        }
        let spec = DataSpec::Mnist(dir.path().to_path_buf());
        let s = load(&spec, Some(0.5)).unwrap();
        assert_eq!((s.train.len(), s.heldout.len()), (30, 7));
        assert_eq!(s.holdout.method, "test-split");
        assert_eq!(s.holdout.fraction, None);
    }

    #[test]
    fn real_mnist_t10k_only_splits_8000_2000() {
        let spec = DataSpec::Mnist(test_data_dir().join("mnist"));
        let s = load(&spec, None).unwrap();
        let (train, held) = (class(&s.train), class(&s.heldout));
        assert_eq!((train.len(), held.len()), (8000, 2000));
        assert_eq!(train.labels[0], 7);
        let full = idx::load_mnist_dir(&test_data_dir().join("mnist")).unwrap().test.unwrap();
        assert_eq!(held.labels[..], full.labels[8000..]);
        assert_eq!(s.holdout, fraction_note(0.2, 8000, 2000));
    }

    #[test]
    fn real_text_holds_out_the_last_tenth() {
        let spec = DataSpec::Text(test_data_dir().join("tinyshakespeare/input.txt"));
        let s = load(&spec, None).unwrap();
        let (Dataset::Text(train), Dataset::Text(held)) = (&s.train, &s.heldout) else {
            panic!("expected text");
        };
        assert_eq!((train.len(), held.len()), (1_003_855, 111_539));
        assert_eq!(train.vocab, held.vocab);
        assert_eq!(train.vocab.len(), 65);
        assert_eq!(s.holdout.fraction, Some(0.1));
    }

    #[test]
    fn loader_errors_pass_through_with_their_path() {
        let err = load(&DataSpec::Cifar10("/no/such/cifar".into()), None).unwrap_err();
        assert!(
            matches!(err, DataError::Cifar(_)) && err.to_string().contains("/no/such/cifar"),
            "{err}"
        );
        let err = load(&DataSpec::Text("/no/such.txt".into()), None).unwrap_err();
        assert!(
            matches!(err, DataError::Text(_)) && err.to_string().contains("/no/such.txt"),
            "{err}"
        );
    }

    #[test]
    fn describe_dir_lists_the_first_names() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(describe_dir(dir.path()), "nothing");
        for i in 0..10 {
            std::fs::write(dir.path().join(format!("f{i}")), "").unwrap();
        }
        assert_eq!(describe_dir(dir.path()), "f0, f1, f2, f3, f4, f5, f6, f7 and 2 more");
    }
}
