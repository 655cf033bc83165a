//! The gRPC server: `murmur.v1.NodeService` over the node's `StatusBoard`,
//! plus `grpc.health.v1.Health` and server reflection (v1 and v1alpha), so
//! grpcurl and any gRPC client work without the .proto files.
//!
//! Status calls are open to anyone who can reach the address (127.0.0.1
//! unless told otherwise). Control calls need the token when one is set;
//! a wrong or missing one gets UNAUTHENTICATED and changes nothing.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use murmur_proto::v1 as pb;
use murmur_proto::v1::node_service_server::{NodeService, NodeServiceServer};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::token::ApiToken;
use super::{Control, SavedCheckpoint};
use crate::fault::FaultSpec;
use crate::net::log_limit::LogLimiter;
use crate::status::StatusBoard;

/// Least time between two WatchStatus messages, and the default.
const WATCH_FLOOR: Duration = Duration::from_millis(100);
const WATCH_DEFAULT: Duration = Duration::from_millis(500);
/// How long a checkpoint request waits for the driver.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot listen for the API on {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
    #[error("gRPC reflection set-up failed: {0}")]
    Reflection(String),
    #[error("cannot serve the API over TLS with --api-tls-cert {cert}: {reason}")]
    Tls { cert: String, reason: String },
}

/// A running API server.
#[derive(Debug)]
pub struct ApiServer {
    /// The address it listens on (the port is real even if 0 was asked for).
    pub addr: SocketAddr,
    /// Whether it serves TLS (clients dial `https://`).
    pub tls: bool,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl ApiServer {
    /// Stops serving and waits for the server to end.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Starts the API on `addr` and returns once it listens.
pub async fn serve(
    addr: SocketAddr,
    token: Option<ApiToken>,
    tls: Option<super::ApiTls>,
    board: StatusBoard,
    control: mpsc::Sender<Control>,
) -> Result<ApiServer, ApiError> {
    let (listener, bound) = bind(addr).await?;
    if token.is_none() && !bound.ip().is_loopback() {
        warn!(%bound, "the API listens beyond this machine without --api-token: anyone who reaches it can inject faults and stop the node");
    }
    if token.is_some() && tls.is_none() && !bound.ip().is_loopback() {
        warn!(%bound, "the API token crosses the network in clear: give --api-tls-cert and --api-tls-key");
    }
    let (reflection_v1, reflection_v1alpha) = reflection()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<NodeServiceServer<NodeApi>>().await;
    let api = NodeApi {
        board,
        token,
        control,
        watchers: Arc::new(Semaphore::new(MAX_WATCHERS)),
        refusal_logs: LogLimiter::new(10, 2, Duration::from_secs(10)),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let server = builder(tls.as_ref())?
        .add_service(NodeServiceServer::new(api))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            let _ = stopped.await;
            health.set_not_serving::<NodeServiceServer<NodeApi>>().await;
        });
    let task = tokio::spawn(async move {
        if let Err(e) = server.await {
            warn!("the API server stopped: {e}");
        }
    });
    info!(%bound, tls = tls.is_some(), "API listening");
    Ok(ApiServer { addr: bound, tls: tls.is_some(), stop: Some(stop), task })
}

/// Server reflection, v1 and v1alpha, for murmur's services and health:
/// grpcurl and any gRPC client work without the .proto files.
pub fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ApiError,
> {
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(murmur_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| ApiError::Reflection(e.to_string()))?;
    let v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| ApiError::Reflection(e.to_string()))?;
    Ok((v1, v1alpha))
}

/// A gRPC server builder, serving TLS when `tls` is given.
pub fn builder(tls: Option<&super::ApiTls>) -> Result<tonic::transport::Server, ApiError> {
    let builder = tonic::transport::Server::builder();
    match tls {
        None => Ok(builder),
        Some(tls) => builder.tls_config(tls.server_config()).map_err(|e| ApiError::Tls {
            cert: tls.cert_path.display().to_string(),
            reason: format!("{e} ({})", super::client::source_of(&e)),
        }),
    }
}

/// `HOST:PORT` for a server to listen on (`localhost` is 127.0.0.1), as
/// `flag` gave it.
pub fn parse_listen(flag: &str, text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    let local = text.strip_prefix("localhost:").map(|port| format!("127.0.0.1:{port}"));
    local.as_deref().unwrap_or(text).parse().map_err(|_| {
        format!("{flag} {text:?} is not HOST:PORT with a numeric host, as in 127.0.0.1:7070 or 0.0.0.0:7070")
    })
}

/// A listener on `addr`, and the address it really got (port 0 picks one).
pub async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), ApiError> {
    let failed = |e: std::io::Error| ApiError::Bind { addr, reason: e.to_string() };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(failed)?;
    let bound = listener.local_addr().map_err(failed)?;
    Ok((listener, bound))
}

/// The `NodeService` implementation.
struct NodeApi {
    board: StatusBoard,
    token: Option<ApiToken>,
    control: mpsc::Sender<Control>,
    /// Open WatchStatus streams, at most `MAX_WATCHERS`.
    watchers: Arc<Semaphore>,
    /// Refused control calls are logged per client, under a global cap.
    refusal_logs: LogLimiter<String>,
}

/// WatchStatus streams served at once; each holds a task and a timer.
const MAX_WATCHERS: usize = 16;

impl NodeApi {
    /// Refuses a control call without the right token.
    fn authorize<T>(&self, request: &Request<T>, call: &str) -> Result<(), Status> {
        super::token::check(self.token.as_ref(), request, call, "node").inspect_err(|_| {
            let client = request.remote_addr().map_or("unknown".into(), |a| a.ip().to_string());
            self.refusal_logs.warn(&client, call, &"refused: missing or wrong API token");
        })
    }

    async fn ask_driver(&self, c: Control) -> Result<(), Status> {
        self.control.send(c).await.map_err(|_| Status::unavailable("the node is shutting down"))
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::NodeStatus, Status>> + Send>>;

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        Ok(Response::new(self.board.snapshot()))
    }

    type WatchStatusStream = StatusStream;

    async fn watch_status(
        &self,
        request: Request<pb::WatchStatusRequest>,
    ) -> Result<Response<StatusStream>, Status> {
        let interval = match request.get_ref().min_interval_ms {
            0 => WATCH_DEFAULT,
            ms => Duration::from_millis(u64::from(ms)).max(WATCH_FLOOR),
        };
        let Ok(permit) = self.watchers.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "this node serves at most {MAX_WATCHERS} WatchStatus streams at once; poll GetStatus or close one"
            )));
        };
        let (tx, rx) = mpsc::channel(4);
        let board = self.board.clone();
        tokio::spawn(async move {
            watch(board, interval, tx).await;
            drop(permit);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_peers(
        &self,
        _: Request<pb::ListPeersRequest>,
    ) -> Result<Response<pb::ListPeersResponse>, Status> {
        Ok(Response::new(pb::ListPeersResponse { peers: self.board.peers() }))
    }

    async fn inject_fault(
        &self,
        request: Request<pb::InjectFaultRequest>,
    ) -> Result<Response<pb::InjectFaultResponse>, Status> {
        self.authorize(&request, "InjectFault")?;
        let r = request.into_inner();
        let spec = match (&r.fault, r.spec.trim()) {
            (Some(f), "") => FaultSpec::from_proto(f),
            (None, text) if !text.is_empty() => text.parse(),
            (Some(_), _) => {
                return Err(Status::invalid_argument("give either `fault` or `spec`, not both"));
            }
            (None, _) => {
                return Err(Status::invalid_argument(
                    "no fault given: set `fault`, or `spec` in --fault syntax (e.g. \"drop:0.3,for=30s\")",
                ));
            }
        }
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let view = self
            .board
            .faults()
            .inject(spec, Instant::now())
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        info!(id = view.id, spec = %view.spec, "fault injected through the API");
        Ok(Response::new(pb::InjectFaultResponse { fault: Some(view.to_proto()) }))
    }

    async fn clear_faults(
        &self,
        request: Request<pb::ClearFaultsRequest>,
    ) -> Result<Response<pb::ClearFaultsResponse>, Status> {
        self.authorize(&request, "ClearFaults")?;
        let cleared = self.board.faults().clear(&request.get_ref().ids);
        info!(cleared, "faults cleared through the API");
        Ok(Response::new(pb::ClearFaultsResponse { cleared: cleared as u32 }))
    }

    async fn save_checkpoint(
        &self,
        request: Request<pb::SaveCheckpointRequest>,
    ) -> Result<Response<pb::SaveCheckpointResponse>, Status> {
        self.authorize(&request, "SaveCheckpoint")?;
        let (tx, rx) = oneshot::channel();
        self.ask_driver(Control::SaveCheckpoint(tx)).await?;
        let saved: SavedCheckpoint = tokio::time::timeout(CHECKPOINT_TIMEOUT, rx)
            .await
            .map_err(|_| {
                Status::deadline_exceeded("the node did not write its checkpoint in time")
            })?
            .map_err(|_| Status::unavailable("the node stopped before writing its checkpoint"))?
            .map_err(Status::internal)?;
        Ok(Response::new(pb::SaveCheckpointResponse {
            path: saved.path,
            step: saved.step,
            round: saved.round,
        }))
    }

    async fn shutdown(
        &self,
        request: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        self.authorize(&request, "Shutdown")?;
        info!("shutdown requested through the API");
        self.ask_driver(Control::Shutdown).await?;
        Ok(Response::new(pb::ShutdownResponse {}))
    }
}

/// Feeds one WatchStatus stream: the status at once, then whenever it
/// differs from the last one sent (uptime aside), at most once per `interval`.
/// Ends when the client goes away.
async fn watch(
    board: StatusBoard,
    interval: Duration,
    tx: mpsc::Sender<Result<pb::NodeStatus, Status>>,
) {
    let mut changes = board.subscribe();
    let mut faults = board.faults().subscribe();
    let mut last: Option<pb::NodeStatus> = None;
    loop {
        let now = board.snapshot();
        if last.as_ref().is_none_or(|l| differs(l, &now)) {
            if tx.send(Ok(now.clone())).await.is_err() {
                return;
            }
            last = Some(now);
        }
        // The rate limit first, then the next change (or a poll: the
        // network's counters move without the driver's state changing).
        tokio::time::sleep(interval).await;
        tokio::select! {
            _ = changes.changed() => {}
            _ = faults.changed() => {}
            _ = tokio::time::sleep(interval * 4) => {}
            _ = tx.closed() => return,
        }
    }
}

/// Whether two statuses differ in anything but their uptime.
fn differs(a: &pb::NodeStatus, b: &pb::NodeStatus) -> bool {
    let strip = |s: &pb::NodeStatus| {
        let mut s = s.clone();
        s.uptime_seconds = 0.0;
        s.active_faults.iter_mut().for_each(|f| f.remaining_seconds = None);
        s
    };
    strip(a) != strip(b)
}
