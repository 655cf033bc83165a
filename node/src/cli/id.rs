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

#[derive(Debug, clap::Args)]
pub struct ApiCertArgs {
    /// Directory to write api-cert.pem and api-key.pem into; refuses to overwrite them
    out: PathBuf,
    /// A name or IP address clients dial the API by, repeatable [default: 127.0.0.1 and localhost]
    #[arg(long = "host")]
    hosts: Vec<String>,
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
    // Whoever reads the key joins the swarm: owner only, as identity.key.
    write_new(&args.out, &key.to_key_file(), true)?;
    println!("wrote swarm key {} (fingerprint {fingerprint})", args.out.display());
    Ok(())
}

/// Creates `path` (never over an existing file), readable by its owner
/// only when `private`, and writes `text`.
fn write_new(path: &std::path::Path, text: &str, private: bool) -> Result<(), CliError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, if private { 0o600 } else { 0o644 });
    let mut file = opts
        .open(path)
        .map_err(|e| CliError::usage(format!("cannot create {}: {e}", path.display())))?;
    file.write_all(text.as_bytes())
        .map_err(|e| CliError::failed(format!("cannot write {}: {e}", path.display())))
}

/// `murmur api-cert DIR`: a self-signed certificate and key for the API's
/// TLS (`--api-tls-cert DIR/api-cert.pem --api-tls-key DIR/api-key.pem`);
/// clients trust the certificate itself (`--api-ca DIR/api-cert.pem`).
pub fn api_cert(args: ApiCertArgs) -> Result<(), CliError> {
    let hosts = match args.hosts.is_empty() {
        true => vec!["127.0.0.1".to_string(), "localhost".to_string()],
        false => args.hosts,
    };
    let (cert, key) = crate::api::tls::self_signed(&hosts).map_err(CliError::usage)?;
    std::fs::create_dir_all(&args.out)
        .map_err(|e| CliError::usage(format!("cannot create {}: {e}", args.out.display())))?;
    let (cert_path, key_path) = (args.out.join("api-cert.pem"), args.out.join("api-key.pem"));
    if key_path.exists() {
        return Err(CliError::usage(format!("{} exists; not overwritten", key_path.display())));
    }
    write_new(&cert_path, &cert, false)?;
    write_new(&key_path, &key, true)?;
    println!(
        "wrote {} and {} (self-signed for {}); serve with --api-tls-cert and --api-tls-key, and give clients --api-ca {}",
        cert_path.display(),
        key_path.display(),
        hosts.join(", "),
        cert_path.display()
    );
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

    #[cfg(unix)]
    #[test]
    fn api_cert_writes_a_private_key_and_never_overwrites() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tls");
        api_cert(ApiCertArgs { out: out.clone(), hosts: Vec::new() }).unwrap();
        let mode = std::fs::metadata(out.join("api-key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        crate::api::ApiTls::load(&out.join("api-cert.pem"), &out.join("api-key.pem")).unwrap();
        assert!(api_cert(ApiCertArgs { out, hosts: Vec::new() }).is_err());
    }
}
