//! A client of one node's API, as `murmur status`, `murmur fault` and
//! `murmur cluster` use it; it also reads a coordinator's.

use std::time::Duration;

use murmur_proto::coordinator::v1 as cpb;
use murmur_proto::coordinator::v1::coordinator_service_client::CoordinatorServiceClient;
use murmur_proto::v1 as pb;
use murmur_proto::v1::node_service_client::NodeServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use super::token::{AUTHORIZATION, ApiToken};
use crate::fault::FaultSpec;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "{addr:?} is not a node API address (expected HOST:PORT, as in 127.0.0.1:7070, or https://HOST:PORT)"
    )]
    BadAddress { addr: String },
    #[error("{0}")]
    Tls(String),
    #[error("cannot reach the node API at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{call} on {addr} failed: {message} ({code:?})")]
    Call { addr: String, call: &'static str, code: tonic::Code, message: String },
}

impl ClientError {
    /// The gRPC status code of a failed call.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Call { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the address serves no such call: a coordinator asked a
    /// node's question, or a node a coordinator's.
    pub fn unimplemented(&self) -> bool {
        self.code() == Some(tonic::Code::Unimplemented)
    }
}

/// A connection to one node.
#[derive(Debug, Clone)]
pub struct NodeClient {
    addr: String,
    inner: NodeServiceClient<Channel>,
    /// The same connection, for a coordinator's API.
    coordinator: CoordinatorServiceClient<Channel>,
    /// The same connection, for gRPC health (nodes and coordinators).
    health: HealthClient<Channel>,
    token: Option<ApiToken>,
}

/// `HOST:PORT`, `http://HOST:PORT` or `https://HOST:PORT` as a URI tonic
/// can dial, and whether it is TLS.
fn endpoint(addr: &str) -> Result<(String, bool), ClientError> {
    let (scheme, bare) = match addr.strip_prefix("https://") {
        Some(rest) => ("https", rest),
        None => ("http", addr.strip_prefix("http://").unwrap_or(addr)),
    };
    let ok = bare.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) && !bare.contains('/')
    });
    if ok {
        Ok((format!("{scheme}://{bare}"), scheme == "https"))
    } else {
        Err(ClientError::BadAddress { addr: addr.to_string() })
    }
}

impl NodeClient {
    /// Connects to the API at `addr`, giving up after `timeout`; an
    /// `https://` address trusts `ca` (a PEM file) or the system's roots.
    pub async fn connect(
        addr: &str,
        token: Option<ApiToken>,
        ca: Option<&std::path::Path>,
        timeout: Duration,
    ) -> Result<NodeClient, ClientError> {
        let (uri, tls) = endpoint(addr)?;
        let connect = |reason: String| ClientError::Connect { addr: addr.to_string(), reason };
        let mut endpoint = Endpoint::from_shared(uri).map_err(|e| connect(e.to_string()))?;
        if tls {
            let tls = super::tls::client_config(ca).map_err(ClientError::Tls)?;
            endpoint = endpoint.tls_config(tls).map_err(|e| connect(e.to_string()))?;
        }
        let channel = endpoint
            .connect_timeout(timeout)
            .connect()
            .await
            .map_err(|e| connect(format!("{e} ({})", source_of(&e))))?;
        Ok(NodeClient {
            addr: addr.to_string(),
            inner: NodeServiceClient::new(channel.clone()),
            coordinator: CoordinatorServiceClient::new(channel.clone()),
            health: HealthClient::new(channel),
            token,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        if let Some(value) = self.token.as_ref().and_then(|t| t.bearer().parse().ok()) {
            r.metadata_mut().insert(AUTHORIZATION, value);
        }
        r
    }

    fn failed(&self, call: &'static str) -> impl Fn(tonic::Status) -> ClientError + '_ {
        move |s| ClientError::Call {
            addr: self.addr.clone(),
            call,
            code: s.code(),
            message: s.message().to_string(),
        }
    }

    /// Whether the server reports itself serving, by `grpc.health.v1`
    /// (the whole server: service name "").
    pub async fn serving(&mut self) -> Result<bool, ClientError> {
        let r = self.request(HealthCheckRequest { service: String::new() });
        let out = self.health.check(r).await.map_err(self.failed("Health.Check"))?;
        Ok(out.into_inner().status == ServingStatus::Serving as i32)
    }

    /// A coordinator's status (the address serves `CoordinatorService`).
    pub async fn coordinator_status(&mut self) -> Result<cpb::CoordinatorStatus, ClientError> {
        let r = self.request(cpb::GetStatusRequest {});
        let out = self.coordinator.get_status(r).await;
        out.map(tonic::Response::into_inner).map_err(self.failed("GetStatus"))
    }

    /// Stops a coordinator.
    pub async fn coordinator_shutdown(&mut self) -> Result<(), ClientError> {
        let r = self.request(cpb::ShutdownRequest {});
        let out = self.coordinator.shutdown(r).await;
        out.map(|_| ()).map_err(self.failed("Shutdown"))
    }

    pub async fn status(&mut self) -> Result<pb::NodeStatus, ClientError> {
        let r = self.request(pb::GetStatusRequest {});
        let out = self.inner.get_status(r).await;
        out.map(tonic::Response::into_inner).map_err(self.failed("GetStatus"))
    }

    /// The node's status stream, at most one message per `min_interval`.
    pub async fn watch(
        &mut self,
        min_interval: Duration,
    ) -> Result<tonic::Streaming<pb::NodeStatus>, ClientError> {
        let ms = u32::try_from(min_interval.as_millis()).unwrap_or(u32::MAX);
        let r = self.request(pb::WatchStatusRequest { min_interval_ms: ms });
        let out = self.inner.watch_status(r).await;
        out.map(tonic::Response::into_inner).map_err(self.failed("WatchStatus"))
    }

    pub async fn peers(&mut self) -> Result<Vec<pb::Peer>, ClientError> {
        let r = self.request(pb::ListPeersRequest {});
        let out = self.inner.list_peers(r).await;
        out.map(|r| r.into_inner().peers).map_err(self.failed("ListPeers"))
    }

    pub async fn inject(&mut self, spec: &FaultSpec) -> Result<pb::ActiveFault, ClientError> {
        let r = self
            .request(pb::InjectFaultRequest { fault: Some(spec.to_proto()), spec: String::new() });
        let out = self.inner.inject_fault(r).await;
        out.map(|r| r.into_inner().fault.unwrap_or_default()).map_err(self.failed("InjectFault"))
    }

    /// Ends the faults `ids`, or all of them; returns how many ended.
    pub async fn clear(&mut self, ids: Vec<u64>) -> Result<u32, ClientError> {
        let r = self.request(pb::ClearFaultsRequest { ids });
        let out = self.inner.clear_faults(r).await;
        out.map(|r| r.into_inner().cleared).map_err(self.failed("ClearFaults"))
    }

    pub async fn checkpoint(&mut self) -> Result<pb::SaveCheckpointResponse, ClientError> {
        let r = self.request(pb::SaveCheckpointRequest {});
        let out = self.inner.save_checkpoint(r).await;
        out.map(tonic::Response::into_inner).map_err(self.failed("SaveCheckpoint"))
    }

    pub async fn shutdown(&mut self) -> Result<(), ClientError> {
        let r = self.request(pb::ShutdownRequest {});
        let out = self.inner.shutdown(r).await;
        out.map(|_| ()).map_err(self.failed("Shutdown"))
    }
}

/// The innermost cause of a transport error, which says what really failed
/// ("Connection refused") where the outer one only says "transport error".
pub(super) fn source_of(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint_uri(addr: &str) -> Result<String, ClientError> {
        endpoint(addr).map(|(uri, _)| uri)
    }

    #[test]
    fn addresses_are_host_and_port() {
        assert_eq!(endpoint_uri("127.0.0.1:7070").unwrap(), "http://127.0.0.1:7070");
        assert_eq!(endpoint_uri("http://node-3:7070").unwrap(), "http://node-3:7070");
        assert_eq!(endpoint_uri("https://node-3:7070").unwrap(), "https://node-3:7070");
        for bad in [
            "127.0.0.1",
            ":7070",
            "127.0.0.1:0",
            "127.0.0.1:99999",
            "http://a:1/x",
            "/ip4/1.2.3.4/tcp/5",
        ] {
            assert!(matches!(endpoint_uri(bad), Err(ClientError::BadAddress { .. })), "{bad}");
        }
    }
}
