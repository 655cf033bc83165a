//! CIFAR-10 binary batches (`data_batch_1.bin`..`data_batch_5.bin`,
//! `test_batch.bin`): reading and checking them, and turning them into
//! standardised `ClassData`. Choosing the held-out part is `load`'s job.

use std::io;
use std::path::{Path, PathBuf};

use super::dataset::ClassData;
use super::load::{LabelledSplits, describe_dir};

/// Bytes per record: one label, then 3x32x32 pixels, channel-major.
pub const RECORD_BYTES: usize = 1 + PIXELS;
const PIXELS: usize = 3 * 32 * 32;
const CLASSES: usize = 10;
const MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
const STD: [f32; 3] = [0.2470, 0.2435, 0.2616];
const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
const TEST_FILE: &str = "test_batch.bin";

/// Why a CIFAR-10 directory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CifarError {
    #[error("CIFAR-10 directory {} does not exist or is not a directory", .0.display())]
    NoDir(PathBuf),
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is {size} bytes, not a positive whole number of {RECORD_BYTES}-byte CIFAR-10 records (1 label + 3x32x32 pixels); is it a CIFAR-10 binary batch?", path.display())]
    BadSize { path: PathBuf, size: u64 },
    #[error("{}: record {record} has label {label}, not a CIFAR-10 class 0..9 (is it CIFAR-100?)", path.display())]
    BadLabel { path: PathBuf, record: usize, label: u8 },
    #[error("no CIFAR-10 batches in {}: expected data_batch_1.bin..data_batch_5.bin and/or test_batch.bin (the binary version); the directory holds: {found}", dir.display())]
    NoSplit { dir: PathBuf, found: String },
}

/// Loads the CIFAR-10 splits found in `dir`: the training batches present
/// (in order 1..5) and the test batch, at least one of the two.
pub fn load_cifar10_dir(dir: &Path) -> Result<LabelledSplits, CifarError> {
    if !dir.is_dir() {
        return Err(CifarError::NoDir(dir.to_path_buf()));
    }
    let present = |names: &[&str]| -> Vec<PathBuf> {
        names.iter().map(|n| dir.join(n)).filter(|p| p.is_file()).collect()
    };
    let splits = LabelledSplits {
        train: read_batches(&present(&TRAIN_FILES))?,
        test: read_batches(&present(&[TEST_FILE]))?,
    };
    if splits.train.is_none() && splits.test.is_none() {
        return Err(CifarError::NoSplit { dir: dir.to_path_buf(), found: describe_dir(dir) });
    }
    Ok(splits)
}

/// The records of `paths`, concatenated; `None` when there are no paths.
fn read_batches(paths: &[PathBuf]) -> Result<Option<ClassData>, CifarError> {
    if paths.is_empty() {
        return Ok(None);
    }
    // (x / 255 - mean[c]) / std[c] for every byte x and channel c.
    let scale: Vec<f32> = (0..3)
        .flat_map(|c| (0..=255u8).map(move |x| (f32::from(x) / 255.0 - MEAN[c]) / STD[c]))
        .collect();
    let mut data = ClassData {
        features: Vec::new(),
        sample_shape: vec![3, 32, 32],
        labels: Vec::new(),
        num_classes: CLASSES,
    };
    for path in paths {
        let bytes = read_batch(path)?;
        data.features.reserve(bytes.len() / RECORD_BYTES * PIXELS);
        for (record, chunk) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
            let label = chunk[0];
            if usize::from(label) >= CLASSES {
                return Err(CifarError::BadLabel { path: path.clone(), record, label });
            }
            data.labels.push(i64::from(label));
            let pixels = chunk[1..].iter().enumerate();
            data.features.extend(pixels.map(|(i, &x)| scale[i / 1024 * 256 + usize::from(x)]));
        }
    }
    Ok(Some(data))
}

/// The bytes of one batch, after checking its size from the metadata so that
/// a wrong (possibly huge) file is refused before it is read.
fn read_batch(path: &Path) -> Result<Vec<u8>, CifarError> {
    let io_err = |source| CifarError::Io { path: path.to_path_buf(), source };
    let size = std::fs::metadata(path).map_err(io_err)?.len();
    if size == 0 || size % RECORD_BYTES as u64 != 0 {
        return Err(CifarError::BadSize { path: path.to_path_buf(), size });
    }
    let bytes = std::fs::read(path).map_err(io_err)?;
    if bytes.len() as u64 != size {
        return Err(CifarError::BadSize { path: path.to_path_buf(), size: bytes.len() as u64 });
    }
    Ok(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `n` records with labels `first_label, first_label + 1, ...` (mod 10);
    /// record r's pixels in channel c all equal `r + c`.
    fn batch(n: usize, first_label: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for r in 0..n {
            out.push(((first_label + r) % 10) as u8);
            for c in 0..3 {
                out.extend(std::iter::repeat_n((r + c) as u8, 1024));
            }
        }
        out
    }

    #[test]
    fn loads_train_batches_in_order_and_the_test_batch() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data_batch_1.bin"), batch(3, 0)).unwrap();
        std::fs::write(dir.path().join("data_batch_3.bin"), batch(2, 5)).unwrap();
        std::fs::write(dir.path().join("test_batch.bin"), batch(4, 9)).unwrap();
        let s = load_cifar10_dir(dir.path()).unwrap();
        let (train, test) = (s.train.unwrap(), s.test.unwrap());
        assert_eq!(train.labels, vec![0, 1, 2, 5, 6]);
        assert_eq!(test.labels, vec![9, 0, 1, 2]);
        assert_eq!(train.sample_shape, vec![3, 32, 32]);
        assert_eq!(train.features.len(), 5 * 3072);
        // Record 1, channel 2 holds byte 3 everywhere.
        let v = train.features[3072 + 2 * 1024 + 17];
        assert!((v - (3.0 / 255.0 - 0.4465) / 0.2616).abs() < 1e-6, "{v}");
        assert!((train.features[0] - (-0.4914 / 0.2470)).abs() < 1e-6);
    }

    #[test]
    fn test_batch_alone_is_a_split() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("test_batch.bin"), batch(2, 0)).unwrap();
        let s = load_cifar10_dir(dir.path()).unwrap();
        assert!(s.train.is_none());
        assert_eq!(s.test.unwrap().len(), 2);
    }

    #[test]
    fn rejects_bad_sizes_labels_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data_batch_2.bin");
        std::fs::write(&path, &batch(2, 0)[..RECORD_BYTES + 5]).unwrap();
        let err = load_cifar10_dir(dir.path()).unwrap_err();
        assert!(matches!(err, CifarError::BadSize { size: 3078, .. }), "{err}");
        assert!(err.to_string().contains("data_batch_2.bin"));

        let mut bad = batch(3, 0);
        bad[2 * RECORD_BYTES] = 10;
        std::fs::write(&path, bad).unwrap();
        let err = load_cifar10_dir(dir.path()).unwrap_err();
        assert!(matches!(err, CifarError::BadLabel { record: 2, label: 10, .. }), "{err}");

        std::fs::remove_file(&path).unwrap();
        std::fs::write(dir.path().join("batches.meta.txt"), "x").unwrap();
        let err = load_cifar10_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("test_batch.bin") && err.contains("batches.meta.txt"), "{err}");
        let err = load_cifar10_dir(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(err, CifarError::NoDir(_)));
    }
}
