//! The coordinator's API: `murmur.coordinator.v1.CoordinatorService` over
//! gRPC (with gRPC health and server reflection, as the node serves them)
//! and Prometheus `/metrics`. Both read the status the coordinator's loop
//! publishes; Shutdown needs the API token when one is set.

use std::net::SocketAddr;

use murmur_core::api::ApiToken;
use murmur_core::api::metrics::{
    MetricsServer, counter, encode_collector, gauge, labelled, serve_rendered,
};
use murmur_core::api::server::{ApiError, bind, builder, reflection};
use murmur_proto::coordinator::v1 as cpb;
use murmur_proto::coordinator::v1::coordinator_service_server::{
    CoordinatorService, CoordinatorServiceServer,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

/// A running API server.
#[derive(Debug)]
pub struct CoordinatorApiServer {
    pub addr: SocketAddr,
    pub tls: bool,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl CoordinatorApiServer {
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

struct Api {
    status: watch::Receiver<cpb::CoordinatorStatus>,
    token: Option<ApiToken>,
    shutdown: mpsc::Sender<()>,
}

#[tonic::async_trait]
impl CoordinatorService for Api {
    async fn get_status(
        &self,
        _: Request<cpb::GetStatusRequest>,
    ) -> Result<Response<cpb::CoordinatorStatus>, Status> {
        Ok(Response::new(self.status.borrow().clone()))
    }

    async fn shutdown(
        &self,
        request: Request<cpb::ShutdownRequest>,
    ) -> Result<Response<cpb::ShutdownResponse>, Status> {
        murmur_core::api::token::check(self.token.as_ref(), &request, "Shutdown", "coordinator")?;
        let _ = self.shutdown.try_send(());
        Ok(Response::new(cpb::ShutdownResponse {}))
    }
}

/// Starts the gRPC API on `addr`; returns once it listens.
pub async fn serve(
    addr: SocketAddr,
    token: Option<ApiToken>,
    tls: Option<murmur_core::api::ApiTls>,
    status: watch::Receiver<cpb::CoordinatorStatus>,
    shutdown: mpsc::Sender<()>,
) -> Result<CoordinatorApiServer, ApiError> {
    let (listener, bound) = bind(addr).await?;
    if token.is_none() && !bound.ip().is_loopback() {
        warn!(%bound, "the API listens beyond this machine without --api-token-file: anyone who reaches it can stop the coordinator");
    }
    let (reflection_v1, reflection_v1alpha) = reflection()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServiceServer<Api>>().await;
    let api = Api { status, token, shutdown };
    let (stop, stopped) = oneshot::channel::<()>();
    let server = builder(tls.as_ref())?
        .add_service(CoordinatorServiceServer::new(api))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            let _ = stopped.await;
            health.set_not_serving::<CoordinatorServiceServer<Api>>().await;
        });
    let task = tokio::spawn(async move {
        if let Err(e) = server.await {
            warn!("the API server stopped: {e}");
        }
    });
    info!(%bound, tls = tls.is_some(), "API listening");
    Ok(CoordinatorApiServer { addr: bound, tls: tls.is_some(), stop: Some(stop), task })
}

/// Serves `/metrics` from the published status.
pub async fn serve_metrics(
    addr: SocketAddr,
    status: watch::Receiver<cpb::CoordinatorStatus>,
) -> Result<MetricsServer, ApiError> {
    serve_rendered(addr, move || encode(status.borrow().clone())).await
}

/// The status as OpenMetrics text.
pub fn encode(status: cpb::CoordinatorStatus) -> Result<String, std::fmt::Error> {
    encode_collector(StatusCollector(status))
}

#[derive(Debug)]
struct StatusCollector(cpb::CoordinatorStatus);

impl Collector for StatusCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let info = prometheus_client::metrics::info::Info::new(vec![
            ("peer_id", s.peer_id.clone()),
            ("run_id", s.run_id.clone()),
            ("target", s.target.clone()),
            ("aggregator", s.aggregator.clone()),
            ("version", s.version.clone()),
        ]);
        info.encode(e.encode_descriptor(
            "murmur_coordinator",
            "What this coordinator is and does",
            None,
            info.metric_type(),
        )?)?;
        gauge(
            &mut e,
            "murmur_coordinator_members",
            "Live training members",
            s.members.len() as f64,
        )?;
        gauge(
            &mut e,
            "murmur_coordinator_sample_size",
            "Members sampled per sampling round",
            f64::from(s.sample_size),
        )?;
        counter(
            &mut e,
            "murmur_coordinator_rounds_sampled",
            "Sampling rounds finished",
            s.rounds_sampled,
        )?;
        counter(
            &mut e,
            "murmur_coordinator_rounds_aggregated",
            "Sampling rounds that sent an average",
            s.rounds_aggregated,
        )?;
        if let Some(last) = s.samples.last() {
            gauge(
                &mut e,
                "murmur_coordinator_last_round",
                "The last sampling round",
                last.round as f64,
            )?;
            gauge(
                &mut e,
                "murmur_coordinator_last_answered",
                "Sampled members that answered in the last sampling round",
                last.answered.len() as f64,
            )?;
            gauge(
                &mut e,
                "murmur_coordinator_last_seconds",
                "From the request to the average, last sampling round",
                last.seconds,
            )?;
        }
        counter(
            &mut e,
            "murmur_coordinator_bytes_sent",
            "Payload and gossip bytes sent",
            s.bytes_sent,
        )?;
        counter(
            &mut e,
            "murmur_coordinator_bytes_received",
            "Payload and gossip bytes received",
            s.bytes_received,
        )?;
        counter(
            &mut e,
            "murmur_coordinator_send_failures",
            "Requests and averages that failed after their retries",
            s.send_failures,
        )?;
        labelled(
            &mut e,
            "murmur_coordinator_refusals",
            "Parameters and payloads not taken, by reason",
            "reason",
            &s.refusals,
        )?;
        gauge(
            &mut e,
            "murmur_coordinator_uptime_seconds",
            "Seconds since start",
            s.uptime_seconds,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_name_what_the_status_says() {
        let status = cpb::CoordinatorStatus {
            peer_id: "p".into(),
            target: "s2a".into(),
            members: vec![cpb::Member::default(); 3],
            rounds_sampled: 7,
            samples: vec![cpb::SampleRound {
                round: 9,
                answered: vec!["a".into()],
                ..Default::default()
            }],
            refusals: [("wrong_round".to_string(), 2)].into_iter().collect(),
            ..Default::default()
        };
        let text = encode(status).unwrap();
        for line in [
            "murmur_coordinator_members 3",
            "murmur_coordinator_rounds_sampled_total 7",
            "murmur_coordinator_last_round 9",
            "murmur_coordinator_refusals_total{reason=\"wrong_round\"} 2",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
