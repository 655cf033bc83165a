//! Prometheus `/metrics`: the node's status in the OpenMetrics text format,
//! on an HTTP port of its own (`--metrics HOST:PORT`).
//!
//! Every scrape encodes a fresh `StatusBoard::snapshot()`, the same value
//! GetStatus returns, so the two never disagree. Counters carry `_total`.

use std::net::SocketAddr;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use murmur_proto::v1 as pb;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::server::{ApiError, bind};
use crate::status::StatusBoard;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A running metrics endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves the node's `/metrics` on `addr` until the returned value is dropped.
pub async fn serve_metrics(
    addr: SocketAddr,
    board: StatusBoard,
) -> Result<MetricsServer, ApiError> {
    serve_rendered(addr, move || encode(board.snapshot())).await
}

/// Serves `/metrics` on `addr`, each scrape the text `render` makes now,
/// until the returned value is dropped.
pub async fn serve_rendered(
    addr: SocketAddr,
    render: impl Fn() -> Result<String, std::fmt::Error> + Clone + Send + Sync + 'static,
) -> Result<MetricsServer, ApiError> {
    let (listener, bound) = bind(addr).await?;
    let app = Router::new().route("/metrics", get(move || scrape(render.clone())));
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stopped.await;
        });
        if let Err(e) = served.await {
            warn!("the metrics endpoint stopped: {e}");
        }
    });
    info!(%bound, "metrics listening");
    if !bound.ip().is_loopback() {
        warn!(%bound, "/metrics is served beyond this machine: anyone who reaches it reads this process's state (no token guards it)");
    }
    Ok(MetricsServer { addr: bound, stop: Some(stop) })
}

async fn scrape(render: impl Fn() -> Result<String, std::fmt::Error>) -> impl IntoResponse {
    match render() {
        Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("cannot encode the metrics: {e}"),
        ),
    }
}

/// The status as OpenMetrics text.
pub fn encode(status: pb::NodeStatus) -> Result<String, std::fmt::Error> {
    encode_collector(StatusCollector(status))
}

/// What `collector` says now, as OpenMetrics text.
pub fn encode_collector(collector: impl Collector + 'static) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// One snapshot, encoded as metrics.
#[derive(Debug)]
struct StatusCollector(pb::NodeStatus);

pub fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

pub fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

/// A counter with one label, one series per entry of `values`.
pub fn labelled(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &std::collections::BTreeMap<String, u64>,
) -> Result<(), std::fmt::Error> {
    let probe = ConstCounter::new(0u64);
    let mut family = e.encode_descriptor(name, help, None, probe.metric_type())?;
    for (key, v) in values {
        let labels = [(label, key.as_str())];
        ConstCounter::new(*v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for StatusCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let t = s.traffic.unwrap_or_default();
        let phase = pb::Phase::try_from(s.phase).unwrap_or_default();
        {
            let info = prometheus_client::metrics::info::Info::new(vec![
                ("peer_id", s.peer_id.clone()),
                ("run_id", s.run_id.clone()),
                ("strategy", s.strategy.clone()),
                ("version", s.version.clone()),
                ("phase", phase.as_str_name().trim_start_matches("PHASE_").to_lowercase()),
                ("model_hash", s.model_hash.clone()),
            ]);
            info.encode(e.encode_descriptor(
                "murmur_node",
                "What this node is and does",
                None,
                info.metric_type(),
            )?)?;
        }
        gauge(&mut e, "murmur_round", "Rounds completed", s.round as f64)?;
        gauge(&mut e, "murmur_rounds_planned", "Rounds planned", s.rounds as f64)?;
        gauge(&mut e, "murmur_step", "Local steps completed", s.step as f64)?;
        gauge(&mut e, "murmur_steps_planned", "Local steps planned", s.steps_planned as f64)?;
        if let Some(v) = s.train_loss {
            gauge(&mut e, "murmur_train_loss", "Mean training loss over the last local phase", v)?;
        }
        if let Some(v) = s.eval_loss {
            gauge(&mut e, "murmur_eval_loss", "Held-out loss at the last evaluation", v)?;
        }
        if let Some(v) = s.eval_accuracy {
            gauge(&mut e, "murmur_eval_accuracy", "Held-out accuracy at the last evaluation", v)?;
        }
        if let Some(v) = s.consensus_distance {
            gauge(
                &mut e,
                "murmur_consensus_distance",
                "Mean L2 distance to the neighbours mixed last",
                v,
            )?;
        }
        if let Some(v) = s.outer_steps {
            counter(&mut e, "murmur_outer_steps", "DiLoCo outer steps applied", v)?;
        }
        if let Some(v) = s.outer_lr {
            gauge(&mut e, "murmur_outer_lr", "DiLoCo outer learning rate", v)?;
        }
        if let Some(v) = s.bytes_per_outer_step {
            gauge(&mut e, "murmur_bytes_per_outer_step", "Bytes sent per DiLoCo outer step", v)?;
        }
        if let Some(c) = &s.coordinator {
            let up = if c.state == "ok" { 1.0 } else { 0.0 };
            gauge(
                &mut e,
                "murmur_coordinator_up",
                "1 while the coordinator's heartbeats arrive",
                up,
            )?;
            counter(
                &mut e,
                "murmur_coordinator_sampled",
                "Rounds this node was sampled in",
                c.sampled,
            )?;
            counter(
                &mut e,
                "murmur_coordinator_averages",
                "Coordinator averages taken",
                c.averages,
            )?;
            counter(
                &mut e,
                "murmur_coordinator_timeouts",
                "Waits for a coordinator average that ended without one",
                c.timeouts,
            )?;
        }
        counter(&mut e, "murmur_samples_seen", "Training examples processed", s.samples_seen)?;
        counter(&mut e, "murmur_bytes_sent", "Payload and gossip bytes sent", t.bytes_sent)?;
        counter(
            &mut e,
            "murmur_bytes_received",
            "Payload and gossip bytes received",
            t.bytes_received,
        )?;
        counter(
            &mut e,
            "murmur_messages_sent",
            "Payloads and gossip messages sent",
            t.messages_sent,
        )?;
        counter(
            &mut e,
            "murmur_messages_received",
            "Payloads and gossip messages received",
            t.messages_received,
        )?;
        counter(
            &mut e,
            "murmur_send_failures",
            "Sends that failed after their retries",
            s.send_failures,
        )?;
        labelled(
            &mut e,
            "murmur_refusals",
            "Payloads and connections refused",
            "reason",
            &s.refusals,
        )?;
        labelled(
            &mut e,
            "murmur_strategy_drops",
            "Messages the strategy did not mix",
            "reason",
            &s.strategy_drops,
        )?;
        labelled(
            &mut e,
            "murmur_fault_effects",
            "What injected faults did",
            "effect",
            &s.fault_effects,
        )?;
        gauge(
            &mut e,
            "murmur_connected_peers",
            "Peers with an open connection",
            f64::from(s.connected_peers),
        )?;
        gauge(
            &mut e,
            "murmur_live_members",
            "Live run members, this node included",
            f64::from(s.live_members),
        )?;
        gauge(
            &mut e,
            "murmur_active_faults",
            "Faults this node holds",
            s.active_faults.len() as f64,
        )?;
        gauge(&mut e, "murmur_uptime_seconds", "Seconds since the node started", s.uptime_seconds)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_encodes_as_openmetrics() {
        let status = pb::NodeStatus {
            peer_id: "12D3KooWtest".into(),
            run_id: "r1".into(),
            strategy: "gossip".into(),
            phase: pb::Phase::Training as i32,
            round: 7,
            train_loss: Some(0.25),
            traffic: Some(pb::Traffic { bytes_sent: 1234, ..Default::default() }),
            refusals: [("non_finite".to_string(), 3u64), ("wrong_run".to_string(), 1)].into(),
            ..Default::default()
        };
        let text = encode(status).unwrap();
        for line in [
            "murmur_round 7.0",
            "murmur_train_loss 0.25",
            "murmur_bytes_sent_total 1234",
            "murmur_refusals_total{reason=\"non_finite\"} 3",
            "murmur_refusals_total{reason=\"wrong_run\"} 1",
            "phase=\"training\"",
            "# EOF",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(!text.contains("murmur_eval_loss"), "no evaluation yet, no gauge");
    }
}
