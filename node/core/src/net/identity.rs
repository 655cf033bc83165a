//! A node's identity: an ed25519 key kept in its data directory, created on
//! first start and reused after, so that a node keeps its peer id across
//! restarts (peers and allowlists refer to it).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

/// File name of the key inside `--data-dir`.
pub const KEY_FILE: &str = "identity.key";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot create --data-dir {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot read identity key {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "identity key {path} is not a libp2p protobuf-encoded keypair ({reason}); move it away to create a new identity"
    )]
    Decode { path: PathBuf, reason: String },
    #[error("cannot write identity key {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Loads the key in `data_dir`, or creates and saves a new ed25519 key.
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(KEY_FILE);
    if path.exists() {
        let bytes =
            fs::read(&path).map_err(|source| IdentityError::Read { path: path.clone(), source })?;
        return Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| IdentityError::Decode { path, reason: e.to_string() });
    }
    fs::create_dir_all(data_dir)
        .map_err(|source| IdentityError::CreateDir { path: data_dir.to_path_buf(), source })?;
    let key = Keypair::generate_ed25519();
    let bytes = key
        .to_protobuf_encoding()
        .map_err(|e| IdentityError::Decode { path: path.clone(), reason: e.to_string() })?;
    write_private(&path, &bytes).map_err(|source| IdentityError::Write { path, source })?;
    Ok(key)
}

/// Writes a file readable by its owner only, via a temporary name so a
/// crash never leaves half a key behind.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("partial");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(&dir.path().join("node")).unwrap();
        let b = load_or_create(&dir.path().join("node")).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        let other = load_or_create(&dir.path().join("other")).unwrap();
        assert_ne!(a.public().to_peer_id(), other.public().to_peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode =
                fs::metadata(dir.path().join("node").join(KEY_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_corrupt_key_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(KEY_FILE), b"garbage").unwrap();
        let err = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains(KEY_FILE), "{err}");
        assert_eq!(fs::read(dir.path().join(KEY_FILE)).unwrap(), b"garbage");
    }
}
