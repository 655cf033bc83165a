//! `murmur id` prints a node's peer id (creating its key on first use), and
//! `murmur swarm-key` writes a new pre-shared key for a private swarm.

use std::io::Write;
use std::path::PathBuf;

use libp2p::pnet::PreSharedKey;
use rand::RngCore;

use super::CliError;
use crate::net::identity;

#[derive(Debug, clap::Args)]
pub struct IdArgs {
    /// The node's data directory (its key lives in identity.key)
    #[arg(long)]
    data_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct SwarmKeyArgs {
    /// Where to write the key; refuses to overwrite an existing file
    out: PathBuf,
}

pub fn id(args: IdArgs) -> Result<(), CliError> {
    let key = identity::load_or_create(&args.data_dir).map_err(CliError::usage)?;
    println!("{}", key.public().to_peer_id());
    Ok(())
}

pub fn swarm_key(args: SwarmKeyArgs) -> Result<(), CliError> {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let key = PreSharedKey::new(bytes);
    let fingerprint = key.fingerprint();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    // Whoever reads the key joins the swarm: owner only, as identity.key.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut file = opts
        .open(&args.out)
        .map_err(|e| CliError::usage(format!("cannot create {}: {e}", args.out.display())))?;
    file.write_all(key.to_key_file().as_bytes())
        .map_err(|e| CliError::failed(format!("cannot write {}: {e}", args.out.display())))?;
    println!("wrote swarm key {} (fingerprint {fingerprint})", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn swarm_key_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("swarm.key");
        swarm_key(SwarmKeyArgs { out: out.clone() }).unwrap();
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.parse::<PreSharedKey>().is_ok(), "{text}");
        assert!(swarm_key(SwarmKeyArgs { out }).is_err(), "an existing key is never overwritten");
    }
}
