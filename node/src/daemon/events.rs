//! Everything a node reacts to, as one stream: trainer replies, network
//! events, the strategy's deadline, finished sends, API requests, stop
//! requests and fault changes. `Inputs::next` is the driver's only `select`;
//! each arm only reads, so no source waits on another, and a shard owner
//! answers its peers while its trainer computes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::shutdown::{Shutdown, StopReason};
use super::worker::Reply;
use crate::api::{Control, SavedCheckpoint};
use crate::fault::Faults;
use crate::net::outbox::{Outbox, SendFailure};
use crate::net::service::NetEvent;

/// One thing that happened.
#[derive(Debug)]
pub enum Event {
    Trainer(Reply),
    Net(NetEvent),
    /// The network's event channel closed: the node cannot go on.
    NetClosed,
    /// The deadline the driver asked for has passed.
    Deadline,
    /// A send finished (or gave up).
    Sent(Result<(), SendFailure>),
    Stop(StopReason),
    SaveCheckpoint(oneshot::Sender<Result<SavedCheckpoint, String>>),
    /// Faults were injected or cleared, or a pause ended.
    FaultsChanged,
}

/// What the driver waits for this time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wait {
    /// When to wake with `Deadline`, if nothing else comes first.
    pub deadline: Option<Instant>,
    /// Whether to take network events (a paused node does not).
    pub network: bool,
    /// Whether the node is paused (then the end of the pause wakes it).
    pub paused: bool,
}

/// The sources of events (the outbox is passed in: the driver sends on it).
pub struct Inputs {
    trainer: mpsc::Receiver<Reply>,
    net: mpsc::Receiver<NetEvent>,
    control: mpsc::Receiver<Control>,
    /// Keeps `control` open when no API serves (so it never reads as closed).
    _control_tx: mpsc::Sender<Control>,
    shutdown: Shutdown,
    faults: Arc<Faults>,
    fault_changes: watch::Receiver<u64>,
}

impl std::fmt::Debug for Inputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inputs").finish_non_exhaustive()
    }
}

impl Inputs {
    pub fn new(
        trainer: mpsc::Receiver<Reply>,
        net: mpsc::Receiver<NetEvent>,
        (control_tx, control): (mpsc::Sender<Control>, mpsc::Receiver<Control>),
        faults: Arc<Faults>,
    ) -> Inputs {
        let fault_changes = faults.subscribe();
        Inputs {
            trainer,
            net,
            control,
            _control_tx: control_tx,
            shutdown: Shutdown::new(),
            faults,
            fault_changes,
        }
    }

    /// The next event.
    pub async fn next(&mut self, outbox: &mut Outbox, wait: Wait) -> Event {
        let deadline = wait.deadline.map(tokio::time::Instant::from_std);
        let faults = self.faults.clone();
        tokio::select! {
            reply = self.trainer.recv() => match reply {
                Some(r) => Event::Trainer(r),
                None => Event::Trainer(Err(super::worker::WorkerError::Stopped)),
            },
            ev = self.net.recv(), if wait.network => match ev {
                Some(ev) => Event::Net(ev),
                None => Event::NetClosed,
            },
            _ = sleep_until(deadline) => Event::Deadline,
            done = outbox.next_done(), if !outbox.is_idle() => Event::Sent(done),
            reason = self.shutdown.recv() => Event::Stop(reason),
            c = self.control.recv() => match c {
                Some(Control::SaveCheckpoint(reply)) => Event::SaveCheckpoint(reply),
                Some(Control::Shutdown) => Event::Stop(StopReason::Api),
                // The sender half lives in `self`: never closed.
                None => Event::FaultsChanged,
            },
            _ = self.fault_changes.changed() => Event::FaultsChanged,
            _ = faults.wait_unpaused(), if wait.paused => Event::FaultsChanged,
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// How often the joining stage looks at the membership again.
pub const JOIN_POLL: Duration = Duration::from_millis(100);
