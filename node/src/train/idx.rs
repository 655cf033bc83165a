//! The IDX file format (MNIST), gzipped or not, and the MNIST directory layout.
//!
//! Owns reading and checking IDX files and turning MNIST images and labels
//! into standardised `ClassData`; choosing the held-out part is `load`'s job.
//! Every size comes from the file, so reads are bounded by what the file can
//! really hold, never by what its header claims.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use super::dataset::ClassData;
use super::load::{LabelledSplits, describe_dir};

/// The largest data section accepted (4 GiB; the MNIST training images are 47 MB).
const MAX_DATA_BYTES: u64 = 1 << 32;
/// IDX element type of unsigned bytes, the only one MNIST uses.
const TYPE_U8: u8 = 0x08;
/// The other element types the format defines (i8, i16, i32, f32, f64).
const OTHER_TYPES: [u8; 5] = [0x09, 0x0b, 0x0c, 0x0d, 0x0e];
const MNIST_MEAN: f32 = 0.1307;
const MNIST_STD: f32 = 0.3081;
const MNIST_CLASSES: usize = 10;

/// An n-dimensional array of bytes read from an IDX file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    /// `dims.iter().product()` bytes, row-major.
    pub data: Vec<u8>,
}

/// Why an IDX file or an MNIST directory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: bad IDX magic number {magic:02x?} (expected 00 00 08 NDIMS); is it an IDX file, gzipped or not?", path.display())]
    BadMagic { path: PathBuf, magic: [u8; 4] },
    #[error("{}: IDX element type 0x{code:02x} is not supported (only unsigned bytes, 0x08)", path.display())]
    UnsupportedType { path: PathBuf, code: u8 },
    #[error("{} is truncated: it ends inside the IDX header; download it again", path.display())]
    TruncatedHeader { path: PathBuf },
    #[error("{} is truncated: its header declares dims {dims:?}, expected {expected} data bytes but found {actual}; download it again", path.display())]
    Truncated { path: PathBuf, dims: Vec<usize>, expected: u64, actual: u64 },
    #[error("{} holds more than the {expected} data bytes its header declares (dims {dims:?}); is it corrupt?", path.display())]
    TrailingData { path: PathBuf, dims: Vec<usize>, expected: u64 },
    #[error("{}: IDX dims {dims:?} need more than the {MAX_DATA_BYTES}-byte limit", path.display())]
    TooLarge { path: PathBuf, dims: Vec<usize> },
    #[error("MNIST directory {} does not exist or is not a directory", .0.display())]
    NoDir(PathBuf),
    #[error("no MNIST split in {}: expected train-images-idx3-ubyte + train-labels-idx1-ubyte and/or t10k-images-idx3-ubyte + t10k-labels-idx1-ubyte (each may end in .gz); the directory holds: {found}", dir.display())]
    NoSplit { dir: PathBuf, found: String },
    #[error("{}: expected {what}, but the IDX dims are {dims:?}", path.display())]
    Shape { path: PathBuf, what: &'static str, dims: Vec<usize> },
    #[error("{} holds {images} images but {} holds {labels} labels; they must match", images_path.display(), labels_path.display())]
    CountMismatch { images_path: PathBuf, images: usize, labels_path: PathBuf, labels: usize },
    #[error("{}: label {label} at index {index} is not a digit 0..9", path.display())]
    BadLabel { path: PathBuf, index: usize, label: u8 },
}

/// Reads an IDX file of unsigned bytes, gzipped (detected by its magic bytes,
/// not its name) or raw. The data must be exactly as long as the dims say.
pub fn read_idx(path: &Path) -> Result<IdxArray, IdxError> {
    let io_err = |source| IdxError::Io { path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(io_err)?;
    let mut head = Vec::with_capacity(2);
    (&mut file).take(2).read_to_end(&mut head).map_err(io_err)?;
    file.seek(SeekFrom::Start(0)).map_err(io_err)?;
    if head == [0x1f, 0x8b] {
        read_stream(path, BufReader::new(MultiGzDecoder::new(BufReader::new(file))), None)
    } else {
        let len = file.metadata().map_err(io_err)?.len();
        read_stream(path, BufReader::new(file), Some(len))
    }
}

/// Parses an IDX stream; `file_len` is the stream's length when it is known
/// up front (raw files), so that a short file is refused before any read.
fn read_stream(path: &Path, mut r: impl Read, file_len: Option<u64>) -> Result<IdxArray, IdxError> {
    let mut magic = [0u8; 4];
    read_header(path, &mut r, &mut magic)?;
    match magic {
        [0, 0, TYPE_U8, n] if n > 0 => {}
        [0, 0, code, _] if OTHER_TYPES.contains(&code) => {
            return Err(IdxError::UnsupportedType { path: path.to_path_buf(), code });
        }
        _ => return Err(IdxError::BadMagic { path: path.to_path_buf(), magic }),
    }
    let mut raw_dims = vec![0u8; 4 * usize::from(magic[3])];
    read_header(path, &mut r, &mut raw_dims)?;
    let dims: Vec<usize> = raw_dims
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&n| n <= MAX_DATA_BYTES)
        .ok_or_else(|| IdxError::TooLarge { path: path.to_path_buf(), dims: dims.clone() })?;
    let truncated = |actual| IdxError::Truncated {
        path: path.to_path_buf(),
        dims: dims.clone(),
        expected,
        actual,
    };
    let trailing =
        || IdxError::TrailingData { path: path.to_path_buf(), dims: dims.clone(), expected };

    if let Some(len) = file_len {
        let actual = len.saturating_sub(4 + raw_dims.len() as u64);
        if actual < expected {
            return Err(truncated(actual));
        }
        if actual > expected {
            return Err(trailing());
        }
    }
    // Reading through `take` bounds the buffer by what the stream really
    // holds (a gzip header can claim anything), plus one byte to see excess.
    let mut data = Vec::new();
    match r.take(expected + 1).read_to_end(&mut data) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(truncated(data.len() as u64));
        }
        Err(source) => return Err(IdxError::Io { path: path.to_path_buf(), source }),
    }
    match (data.len() as u64).cmp(&expected) {
        std::cmp::Ordering::Less => Err(truncated(data.len() as u64)),
        std::cmp::Ordering::Greater => Err(trailing()),
        std::cmp::Ordering::Equal => Ok(IdxArray { dims, data }),
    }
}

fn read_header(path: &Path, r: &mut impl Read, buf: &mut [u8]) -> Result<(), IdxError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => IdxError::TruncatedHeader { path: path.to_path_buf() },
        _ => IdxError::Io { path: path.to_path_buf(), source: e },
    })
}

/// Loads the MNIST splits found in `dir`: `train-*` and `t10k-*` images and
/// labels, each raw or gzipped. A split is present when both of its files
/// are; at least one split must be.
pub fn load_mnist_dir(dir: &Path) -> Result<LabelledSplits, IdxError> {
    if !dir.is_dir() {
        return Err(IdxError::NoDir(dir.to_path_buf()));
    }
    let splits =
        LabelledSplits { train: load_split(dir, "train")?, test: load_split(dir, "t10k")? };
    if splits.train.is_none() && splits.test.is_none() {
        return Err(IdxError::NoSplit { dir: dir.to_path_buf(), found: describe_dir(dir) });
    }
    Ok(splits)
}

fn load_split(dir: &Path, prefix: &str) -> Result<Option<ClassData>, IdxError> {
    let find = |stem: String| {
        [dir.join(&stem), dir.join(format!("{stem}.gz"))].into_iter().find(|p| p.is_file())
    };
    let images = find(format!("{prefix}-images-idx3-ubyte"));
    let labels = find(format!("{prefix}-labels-idx1-ubyte"));
    match (images, labels) {
        (Some(images), Some(labels)) => mnist_split(&images, &labels).map(Some),
        (None, None) => Ok(None),
        (Some(one), None) | (None, Some(one)) => {
            tracing::warn!(file = %one.display(), "MNIST {prefix} split has only one of its two files; ignoring it");
            Ok(None)
        }
    }
}

/// Standardised images `[n, 1, h, w]` and their labels.
fn mnist_split(images_path: &Path, labels_path: &Path) -> Result<ClassData, IdxError> {
    let images = read_idx(images_path)?;
    let labels = read_idx(labels_path)?;
    let [n, h, w] = images.dims[..] else {
        return Err(IdxError::Shape {
            path: images_path.to_path_buf(),
            what: "3-D images (count, height, width)",
            dims: images.dims,
        });
    };
    if labels.dims.len() != 1 {
        return Err(IdxError::Shape {
            path: labels_path.to_path_buf(),
            what: "1-D labels",
            dims: labels.dims,
        });
    }
    if labels.dims[0] != n {
        return Err(IdxError::CountMismatch {
            images_path: images_path.to_path_buf(),
            images: n,
            labels_path: labels_path.to_path_buf(),
            labels: labels.dims[0],
        });
    }
    if let Some((index, &label)) =
        labels.data.iter().enumerate().find(|(_, l)| usize::from(**l) >= MNIST_CLASSES)
    {
        return Err(IdxError::BadLabel { path: labels_path.to_path_buf(), index, label });
    }
    let scale: Vec<f32> =
        (0..=255u8).map(|p| (f32::from(p) / 255.0 - MNIST_MEAN) / MNIST_STD).collect();
    Ok(ClassData {
        features: images.data.iter().map(|&p| scale[usize::from(p)]).collect(),
        sample_shape: vec![1, h, w],
        labels: labels.data.iter().map(|&l| i64::from(l)).collect(),
        num_classes: MNIST_CLASSES,
    })
}

/// Test helper: writes an IDX file of bytes, gzipped or not.
#[cfg(test)]
pub(crate) fn write_idx(path: &Path, dims: &[usize], data: &[u8], gz: bool) {
    use std::io::Write;
    let mut bytes = vec![0, 0, TYPE_U8, dims.len() as u8];
    for &d in dims {
        bytes.extend_from_slice(&(d as u32).to_be_bytes());
    }
    bytes.extend_from_slice(data);
    if gz {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&bytes).expect("gzip in memory");
        bytes = enc.finish().expect("gzip in memory");
    }
    std::fs::write(path, bytes).expect("write test IDX file");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::train::load::test_data_dir;

    #[test]
    fn reads_raw_and_gzipped_idx() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..24).collect();
        for (name, gz) in [("a.idx", false), ("a.idx.gz", true), ("gz-without-suffix", true)] {
            let path = dir.path().join(name);
            write_idx(&path, &[2, 3, 4], &data, gz);
            let arr = read_idx(&path).unwrap();
            assert_eq!(arr, IdxArray { dims: vec![2, 3, 4], data: data.clone() }, "{name}");
        }
    }

    #[test]
    fn rejects_bad_magic_and_other_types() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        std::fs::write(&path, b"PK\x03\x04 not idx").unwrap();
        let err = read_idx(&path).unwrap_err().to_string();
        assert!(err.contains("magic") && err.contains("50, 4b, 03, 04"), "{err}");
        std::fs::write(&path, [0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0]).unwrap();
        let err = read_idx(&path).unwrap_err().to_string();
        assert!(err.contains("element type 0x0d"), "{err}");
        std::fs::write(&path, [0, 0, 8]).unwrap();
        assert!(matches!(read_idx(&path), Err(IdxError::TruncatedHeader { .. })));
    }

    #[test]
    fn rejects_truncated_and_overlong_files() {
        let dir = tempfile::tempdir().unwrap();
        for gz in [false, true] {
            let path = dir.path().join(format!("t{gz}"));
            write_idx(&path, &[10, 5], &[1; 49], gz);
            let err = read_idx(&path).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, IdxError::Truncated { expected: 50, actual: 49, .. }),
                "gz {gz}: {msg}"
            );
            assert!(
                msg.contains("truncated")
                    && msg.contains("expected 50")
                    && msg.contains(&*path.to_string_lossy())
            );
            write_idx(&path, &[10, 5], &[1; 51], gz);
            assert!(
                matches!(read_idx(&path), Err(IdxError::TrailingData { expected: 50, .. })),
                "gz {gz}"
            );
        }
    }

    #[test]
    fn huge_declared_size_is_refused_without_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.gz");
        write_idx(&path, &[u32::MAX as usize, u32::MAX as usize], &[0; 8], true);
        assert!(matches!(read_idx(&path), Err(IdxError::TooLarge { .. })));
        // Within the limit but far beyond the stream: fails as truncated.
        write_idx(&path, &[1 << 16, 1 << 15], &[0; 8], true);
        assert!(matches!(read_idx(&path), Err(IdxError::Truncated { actual: 8, .. })));
    }

    fn write_mnist(dir: &Path, prefix: &str, n: usize, gz: bool) {
        let sfx = if gz { ".gz" } else { "" };
        let pixels: Vec<u8> = (0..n * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        write_idx(&dir.join(format!("{prefix}-images-idx3-ubyte{sfx}")), &[n, 4, 3], &pixels, gz);
        write_idx(&dir.join(format!("{prefix}-labels-idx1-ubyte{sfx}")), &[n], &labels, gz);
    }

    #[test]
    fn loads_mnist_splits_from_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        write_mnist(dir.path(), "train", 12, false);
        write_mnist(dir.path(), "t10k", 5, true);
        let s = load_mnist_dir(dir.path()).unwrap();
        let (train, test) = (s.train.unwrap(), s.test.unwrap());
        assert_eq!((train.len(), test.len()), (12, 5));
        assert_eq!(train.sample_shape, vec![1, 4, 3]);
        assert_eq!(train.labels[..3], [0, 1, 2]);
        assert_eq!(train.features.len(), 12 * 12);
        // Pixel 7 of image 0: (7/255 - 0.1307) / 0.3081.
        assert!((train.features[1] - (7.0 / 255.0 - 0.1307) / 0.3081).abs() < 1e-6);
        assert_eq!(test.num_classes, 10);
    }

    #[test]
    fn mnist_rejects_bad_directories_and_mismatches() {
        let missing = Path::new("/definitely/not/here");
        let err = load_mnist_dir(missing).unwrap_err().to_string();
        assert!(err.contains("/definitely/not/here"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("readme.txt"), "hi").unwrap();
        let err = load_mnist_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("t10k-images-idx3-ubyte") && err.contains("readme.txt"), "{err}");

        write_mnist(dir.path(), "t10k", 5, false);
        write_idx(&dir.path().join("t10k-labels-idx1-ubyte"), &[4], &[1; 4], false);
        assert!(matches!(
            load_mnist_dir(dir.path()),
            Err(IdxError::CountMismatch { images: 5, labels: 4, .. })
        ));
        write_idx(&dir.path().join("t10k-labels-idx1-ubyte"), &[5], &[1, 2, 10, 3, 4], false);
        assert!(matches!(
            load_mnist_dir(dir.path()),
            Err(IdxError::BadLabel { index: 2, label: 10, .. })
        ));
        write_idx(&dir.path().join("t10k-labels-idx1-ubyte"), &[5, 1], &[1; 5], false);
        assert!(matches!(load_mnist_dir(dir.path()), Err(IdxError::Shape { .. })));
    }

    #[test]
    fn real_mnist_test_split() {
        let s = load_mnist_dir(&test_data_dir().join("mnist")).unwrap();
        assert!(s.train.is_none());
        let test = s.test.unwrap();
        assert_eq!(test.len(), 10_000);
        assert_eq!(test.sample_shape, vec![1, 28, 28]);
        assert_eq!(test.labels[..3], [7, 2, 1]);
        assert!((test.features[0] - (-0.1307 / 0.3081)).abs() < 1e-6);
        let mean =
            test.features.iter().map(|&v| f64::from(v)).sum::<f64>() / test.features.len() as f64;
        assert!(mean.abs() < 0.05, "standardised MNIST mean {mean}");
    }
}
