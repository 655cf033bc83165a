//! Which handshake secures a TCP connection: TLS 1.3 (`tls`) or Noise XX
//! (`noise`). A node offers the ones it is given, preferred first, and
//! multistream-select settles on the first the other side also speaks, as
//! libp2p's own builder does for a (tls, noise) pair.
//!
//! TLS comes first by default because on CPUs with AES instructions it moves
//! payloads faster (see `tls`); Noise stays offered so that a peer without
//! TLS still connects.

use std::fmt;
use std::str::FromStr;

use futures::future::{BoxFuture, Either};
use futures::io::BufReader;
use futures::{AsyncRead, AsyncWrite, FutureExt, TryFutureExt};
use libp2p::PeerId;
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};
use libp2p::identity::Keypair;
use libp2p::noise;

use super::tls;

/// Read buffer under Noise. Noise's framing reads the socket 8 KiB at a
/// time; through this buffer one `recv` takes whatever has arrived, up to
/// 64 KiB, which cut the receiver's system calls 27x and its CPU time about
/// 6% for a 64 MiB payload (scripts/bench_transfer.py). TLS goes without:
/// rustls reads a whole record (up to 16 KiB) per call already, and the
/// buffer's extra copy cost more than the calls it saved (bf16 payloads
/// 950 MB/s with it, 1185 without).
const NOISE_READ_BUFFER: usize = 64 * 1024;

/// One security handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    Tls,
    Noise,
}

impl Security {
    /// What this node offers unless told otherwise.
    pub const DEFAULT: [Security; 2] = [Security::Tls, Security::Noise];

    /// Parses `tls`, `noise` or a comma-separated list of them, preferred first.
    pub fn parse_list(text: &str) -> Result<Vec<Security>, String> {
        let mut list = Vec::new();
        for item in text.split(',').map(str::trim) {
            let s: Security = item.parse()?;
            if list.contains(&s) {
                return Err(format!("{item:?} appears twice in {text:?}"));
            }
            list.push(s);
        }
        Ok(list)
    }

    pub fn name(self) -> &'static str {
        match self {
            Security::Tls => "tls",
            Security::Noise => "noise",
        }
    }
}

impl FromStr for Security {
    type Err = String;

    fn from_str(s: &str) -> Result<Security, String> {
        match s {
            "tls" => Ok(Security::Tls),
            "noise" => Ok(Security::Noise),
            other => Err(format!("unknown security {other:?}; use tls, noise or tls,noise")),
        }
    }
}

impl fmt::Display for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The protocol name of each handshake, as multistream-select sees it.
impl AsRef<str> for Security {
    fn as_ref(&self) -> &str {
        match self {
            Security::Tls => tls::PROTOCOL,
            Security::Noise => "/noise",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("noise: {0}")]
    Noise(#[from] noise::Error),
    #[error("no security handshake offered")]
    Empty,
}

/// The security upgrade: the offered handshakes in order, each ready.
#[derive(Clone)]
pub struct SecurityUpgrade {
    offered: Vec<Security>,
    tls: tls::Config,
    noise: noise::Config,
}

impl SecurityUpgrade {
    pub fn new(key: &Keypair, offered: &[Security]) -> Result<SecurityUpgrade, SecurityError> {
        if offered.is_empty() {
            return Err(SecurityError::Empty);
        }
        Ok(SecurityUpgrade {
            offered: offered.to_vec(),
            tls: tls::Config::new(key)?,
            noise: noise::Config::new(key)?,
        })
    }
}

/// A secured connection, whichever handshake made it.
pub type SecureStream<C> = Either<tls::TlsStream<C>, noise::Output<BufReader<C>>>;

type Upgraded<C> = BoxFuture<'static, Result<(PeerId, SecureStream<C>), SecurityError>>;

impl UpgradeInfo for SecurityUpgrade {
    type Info = Security;
    type InfoIter = std::vec::IntoIter<Security>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.offered.clone().into_iter()
    }
}

impl<C> InboundConnectionUpgrade<C> for SecurityUpgrade
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, SecureStream<C>);
    type Error = SecurityError;
    type Future = Upgraded<C>;

    fn upgrade_inbound(self, socket: C, chosen: Security) -> Self::Future {
        match chosen {
            Security::Tls => self
                .tls
                .upgrade_inbound(socket, tls::PROTOCOL)
                .map_ok(|(peer, s)| (peer, Either::Left(s)))
                .err_into()
                .boxed(),
            Security::Noise => self
                .noise
                .upgrade_inbound(BufReader::with_capacity(NOISE_READ_BUFFER, socket), "/noise")
                .map_ok(|(peer, s)| (peer, Either::Right(s)))
                .err_into()
                .boxed(),
        }
    }
}

impl<C> OutboundConnectionUpgrade<C> for SecurityUpgrade
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, SecureStream<C>);
    type Error = SecurityError;
    type Future = Upgraded<C>;

    fn upgrade_outbound(self, socket: C, chosen: Security) -> Self::Future {
        match chosen {
            Security::Tls => self
                .tls
                .upgrade_outbound(socket, tls::PROTOCOL)
                .map_ok(|(peer, s)| (peer, Either::Left(s)))
                .err_into()
                .boxed(),
            Security::Noise => self
                .noise
                .upgrade_outbound(BufReader::with_capacity(NOISE_READ_BUFFER, socket), "/noise")
                .map_ok(|(peer, s)| (peer, Either::Right(s)))
                .err_into()
                .boxed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_in_order_and_bad_ones_name_the_value() {
        assert_eq!(Security::parse_list("tls,noise").unwrap(), Security::DEFAULT);
        assert_eq!(Security::parse_list(" noise ").unwrap(), [Security::Noise]);
        let e = Security::parse_list("tls,quic").unwrap_err();
        assert!(e.contains("\"quic\""), "{e}");
        assert!(Security::parse_list("tls,tls").unwrap_err().contains("twice"));
        assert!(Security::parse_list("").is_err());
    }
}
