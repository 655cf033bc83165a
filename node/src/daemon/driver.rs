//! The node's event loop. It owns the strategy (a sans-IO `Mixer`), turns
//! its actions into trainer jobs and sends, and turns trainer replies, peer
//! messages, membership changes and deadlines into strategy inputs.
//!
//! It never waits on the trainer, the disk or a peer: jobs are queued on
//! the trainer thread and their replies come back as events (`events`), so
//! while the trainer computes the node still answers its peers, its API
//! and its deadlines. A run goes through stages, each a loop over the same
//! events: join (wait for the run's members), rejoin (a resumed node pulls
//! the run's state), run (the strategy), finish (final checkpoint and
//! evaluation while the last sends go out, then `summary.json`).
//!
//! What to do at a round's end, whom to pull from and what to serve are
//! decided by pure functions (`round_end`, `rejoin`); this module only
//! dispatches.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use murmur_proto::v1::Phase;
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use super::config::RunConfig;
use super::events::{Event, Inputs, JOIN_POLL, Wait};
use super::launch::{NodeError, Resume};
use super::record::{EvalFor, Record};
use super::rejoin::{self, PullServer, Pulls, Settled};
use super::report::{FinalMetrics, Reporter};
use super::round_end;
use super::shutdown::StopReason;
use super::summary::NodeSummary;
use super::worker::{Done, Job, PhaseDone, Reply, Worker};
use crate::api::SavedCheckpoint;
use crate::fault::{CRASH_EXIT_CODE, Faults};
use crate::mix::coordinated::Coordination;
use crate::mix::mixer::{Action, Input, Message, Mixer, MsgKind, StrategyState};
use crate::mix::strategy;
use crate::net::membership::Role;
use crate::net::outbox::{Outbox, to_message};
use crate::net::service::{NetEvent, Network};
use crate::params::ParamLayout;
use crate::status::{StatusBoard, model_hash};
use crate::train::checkpoint;
use crate::train::config::TrainConfig;
use crate::train::eval::EvalMetrics;

/// Messages kept while the strategy does not exist yet (joining,
/// rejoining), and the values they may hold in all, in models' worth;
/// beyond either they are dropped (and counted as `backlog_full`).
const MAX_BACKLOG: usize = 1024;
const MAX_BACKLOG_MODELS: usize = 8;

/// How long a resuming node keeps waiting for members once it has seen
/// the run go on without it: a heartbeat. The rejoin then watches the
/// run's rounds (`rejoin::RATE_WINDOW`), which lets the other live members
/// show up before the ones to ask are picked; a run going at several
/// rounds a second would otherwise leave a joiner behind while it waits.
const REJOIN_SETTLE: Duration = Duration::from_secs(1);

/// What the driver is built from.
pub struct Parts {
    pub network: Arc<Network>,
    pub inputs: Inputs,
    pub worker: Worker,
    pub run: RunConfig,
    pub train: TrainConfig,
    pub reporter: Reporter,
    pub layout: ParamLayout,
    /// The trainer's parameters at start (after a checkpoint, if resumed).
    pub initial: Vec<f32>,
    pub data_dir: PathBuf,
    pub options: serde_json::Value,
    pub board: StatusBoard,
    pub faults: Arc<Faults>,
}

/// What a queued trainer job is for; replies come in submission order.
#[derive(Debug)]
enum Pending {
    Train,
    SetParams,
    Evaluate(EvalFor),
    Checkpoint(CheckpointFor),
}

#[derive(Debug)]
enum CheckpointFor {
    Round,
    Api { reply: oneshot::Sender<Result<SavedCheckpoint, String>>, round: u64 },
    Final,
}

/// How the run stage ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Finished,
    Interrupted,
}

pub struct Driver {
    me: PeerId,
    network: Arc<Network>,
    inputs: Inputs,
    worker: Worker,
    jobs: VecDeque<Pending>,
    outbox: Outbox,
    run: RunConfig,
    train: TrainConfig,
    reporter: Reporter,
    fingerprint: String,
    layers: Vec<Range<usize>>,
    parameters: usize,
    initial: Vec<f32>,
    data_dir: PathBuf,
    options: serde_json::Value,
    board: StatusBoard,
    faults: Arc<Faults>,
    record: Record,
    pulls: PullServer,
    /// Messages that arrived before the strategy existed, and how many
    /// did not fit.
    backlog: Vec<Message>,
    backlog_dropped: u64,
    /// Mixed vectors not set because a value was not finite.
    non_finite_refused: u64,
    /// Pull requests not taken, by reason (`PullServer::request`).
    pull_refusals: BTreeMap<&'static str, u64>,
    /// Received values still held by the strategy; given back to the
    /// network's buffers once only this list holds them.
    in_use: Vec<Arc<Vec<f32>>>,
    members: Vec<PeerId>,
    /// Whether the coordinator's heartbeats arrive (semidec, fedavg).
    coordinator_live: bool,
    stop: Option<StopReason>,
    finished: bool,
    paused: bool,
    started: Instant,
}

impl Driver {
    pub fn new(p: Parts) -> Driver {
        let fingerprint = p.layout.fingerprint.to_string();
        let outbox = Outbox::new(p.network.clone(), &p.run.run_id, &fingerprint, p.faults.clone());
        Driver {
            me: p.network.local_peer,
            network: p.network,
            inputs: p.inputs,
            worker: p.worker,
            jobs: VecDeque::new(),
            outbox,
            run: p.run,
            train: p.train,
            reporter: p.reporter,
            fingerprint,
            layers: p.layout.layers(),
            parameters: p.layout.total,
            initial: p.initial,
            data_dir: p.data_dir,
            options: p.options,
            board: p.board,
            faults: p.faults,
            record: Record::default(),
            pulls: PullServer::default(),
            backlog: Vec::new(),
            backlog_dropped: 0,
            non_finite_refused: 0,
            pull_refusals: BTreeMap::new(),
            in_use: Vec::new(),
            members: Vec::new(),
            coordinator_live: false,
            stop: None,
            finished: false,
            paused: false,
            started: Instant::now(),
        }
    }

    /// The whole run: join, rejoin when resuming, train and mix, finish.
    pub async fn run(mut self, resume: Option<Resume>) -> Result<NodeSummary, NodeError> {
        let resumed = resume.as_ref().map(|r| r.round);
        // Joining a run under way is a rejoin with nothing saved: enter at
        // the run's round with a member's state, from round 0 when there
        // is no member to ask.
        let resume =
            resume.or_else(|| self.run.join_running.then_some(Resume { round: 0, state: None }));
        self.join(resume.as_ref().map(|r| r.round)).await?;
        let (start_round, state) = match &resume {
            Some(r) if self.stop.is_none() => self.rejoin(r).await?,
            Some(r) => (r.round, r.state.clone()),
            None => (0, None),
        };
        let members = self.members_in(start_round);
        self.record.members_at_start = members.len();
        self.members = members.clone();
        let mut mixer = strategy::build(
            &self.run.strategy,
            self.me,
            members,
            start_round,
            &self.layers,
            self.parameters,
        )?;
        mixer.set_start_params(&self.initial);
        if let Some(state) = state {
            match mixer.restore(state) {
                Ok(params) => self.set_params(params)?,
                Err(e) => {
                    warn!("cannot take the saved strategy state ({e}); starting from the model")
                }
            }
        }
        let ending = self.run_strategy(mixer.as_mut()).await?;
        let summary = self.finish(mixer.as_mut(), resumed, ending).await;
        // Members drop this node now, not a heartbeat expiry (10 s) later:
        // a joiner stops waiting for its answer, a coordinator samples others.
        self.network.leave().await;
        summary
    }

    /// The live run members that train the same model in `round` (a
    /// rejoining one from the round it announced), this node included.
    fn members_in(&self, round: u64) -> Vec<PeerId> {
        let mut m: Vec<PeerId> = self
            .network
            .view()
            .members
            .iter()
            .filter(|m| m.role == Role::Node && m.fingerprint == self.fingerprint)
            .filter(|m| m.entry_round <= round)
            .map(|m| m.peer)
            .collect();
        m.push(self.me);
        m.sort();
        m.dedup();
        m
    }

    fn submit(&mut self, job: Job, pending: Pending) -> Result<(), NodeError> {
        self.worker.submit(job)?;
        self.jobs.push_back(pending);
        Ok(())
    }

    /// The last guard on what peers shaped: a non-finite mix (or an
    /// overlapped mix's change) never reaches the trainer, which goes on
    /// from its own parameters.
    fn refuse_non_finite(&mut self, values: &[f32], what: &str) -> bool {
        let Some(at) = crate::net::wire::first_non_finite(values) else { return false };
        self.non_finite_refused += 1;
        warn!(index = at, value = values[at], "{what} not finite: not given to the trainer");
        true
    }

    fn set_params(&mut self, values: Vec<f32>) -> Result<(), NodeError> {
        if self.refuse_non_finite(&values, "mixed parameters") {
            return Ok(());
        }
        let hash = model_hash(&values);
        self.submit(Job::SetParams(values), Pending::SetParams)?;
        self.board.update(|s| s.model_hash = hash);
        Ok(())
    }

    /// Queues a mix's change on the trainer (`overlap`).
    fn shift_params(&mut self, delta: Vec<f32>) -> Result<(), NodeError> {
        if self.refuse_non_finite(&delta, "mixed change") {
            return Ok(());
        }
        self.submit(Job::Shift(delta), Pending::SetParams)
    }

    /// A local phase is under way or queued on the trainer.
    fn training_queued(&self) -> bool {
        self.jobs.iter().any(|j| matches!(j, Pending::Train))
    }

    /// What a checkpoint keeps of the strategy: its state when it carries
    /// more than the parameters (DiLoCo's theta and momentum); otherwise
    /// the trainer's model is the whole story.
    fn checkpoint_state(mixer: Option<&dyn Mixer>) -> Option<StrategyState> {
        mixer.and_then(|m| m.snapshot()).filter(|s| s.parts.len() > 1)
    }

    fn checkpoint(
        &mut self,
        round: u64,
        state: Option<StrategyState>,
        why: CheckpointFor,
    ) -> Result<(), NodeError> {
        let mut options = self.options.clone();
        options["round"] = serde_json::json!(round);
        let dir = checkpoint::dir_in(&self.data_dir);
        self.submit(Job::Checkpoint { dir, options, strategy: state }, Pending::Checkpoint(why))
    }

    /// Waits (up to `--join-timeout-ms`) for `--start-members` members
    /// (`--nodes` unless told). A node resuming from round `resumed`, or
    /// joining a run under way, waits only `REJOIN_SETTLE` more once
    /// it sees a member of its run further on: the run went on without it,
    /// some of the others may be gone for good, and it rejoins whoever is
    /// live (the settle lets the live ones connect). A whole cluster
    /// restarted at once still waits for all, none being ahead.
    async fn join(&mut self, resumed: Option<u64>) -> Result<(), NodeError> {
        let mut deadline = Instant::now() + self.run.join_timeout;
        let mut settling = false;
        let wanted = self.run.start_members;
        while self.members_in(self.board.round()).len() < wanted && self.stop.is_none() {
            if !settling && resumed.is_some_and(|r| self.run_went_on(r)) {
                settling = true;
                deadline = deadline.min(Instant::now() + REJOIN_SETTLE);
            }
            if settling && Instant::now() >= deadline {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let found = self.members_in(self.board.round()).len();
                if found < self.run.min_members {
                    return Err(self.too_few_members(found));
                }
                let msg = format!("join timeout: starting with {found} of {wanted} members");
                warn!("{msg}");
                self.board.update(|s| s.last_error = msg);
                return Ok(());
            }
            self.take_one_keeping(now + JOIN_POLL).await?;
        }
        Ok(())
    }

    /// Whether a trainer of this run and model is past round `r`.
    fn run_went_on(&self, r: u64) -> bool {
        let view = self.network.view();
        view.members.iter().any(|m| {
            m.peer != self.me
                && m.role == Role::Node
                && m.fingerprint == self.fingerprint
                && m.round > r
        })
    }

    /// Why the run did not form, with what the network refused (a wrong
    /// swarm key shows as failed handshakes, a missing allowlist entry as
    /// `peer_not_allowed`).
    fn too_few_members(&self, members: usize) -> NodeError {
        let acc = self.network.accounting();
        let refused: Vec<String> = acc
            .refusals
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(reason, n)| format!("{n} {reason}"))
            .collect();
        let refused = if refused.is_empty() {
            "nothing was refused: no peer reached this node".to_string()
        } else {
            format!("refused: {}", refused.join(", "))
        };
        NodeError::TooFewMembers {
            members,
            min: self.run.min_members,
            peers: members.saturating_sub(1),
            expected: self.train.nodes.saturating_sub(1),
            refused,
        }
    }

    /// Keeps a message for the strategy that does not exist yet.
    fn keep(&mut self, m: Message) {
        let held: usize = self.backlog.iter().map(|b| b.values.len()).sum();
        let room = MAX_BACKLOG_MODELS * self.parameters;
        if self.backlog.len() < MAX_BACKLOG && held + m.values.len() <= room {
            self.backlog.push(m);
        } else {
            self.backlog_dropped += 1;
            let dropped = self.backlog_dropped;
            self.board.update(|s| {
                s.strategy_drops.insert("backlog_full".into(), dropped);
            });
        }
    }

    /// Where no member trains this model, a resumed node continues from
    /// its checkpoint (a joining one from round 0).
    async fn rejoin_alone(&mut self, saved: &Resume) -> (u64, Option<StrategyState>) {
        self.network.set_role(Role::Node, saved.round).await;
        (saved.round, saved.state.clone())
    }

    /// A resumed or joining node pulls the run's state from its members
    /// (`rejoin`'s module says how); returns the round to start at and the
    /// state to take.
    async fn rejoin(&mut self, saved: &Resume) -> Result<(u64, Option<StrategyState>), NodeError> {
        let view = self.network.view();
        let Some((_, r0)) = rejoin::pick_source(&view.members, self.me, &self.fingerprint) else {
            return Ok(self.rejoin_alone(saved).await);
        };
        // The parts this node's strategy keeps, from a strategy built only to ask.
        let names = {
            let mut probe = strategy::build(
                &self.run.strategy,
                self.me,
                vec![self.me],
                0,
                &self.layers,
                self.parameters,
            )?;
            probe.set_start_params(&self.initial);
            probe.snapshot().map(|s| s.names()).unwrap_or_default()
        };
        // Watch the run's rounds go by, then pick the round to enter at,
        // and the members to ask, from those training now: one seen before
        // may have stopped meanwhile, or restarted and be pulling itself.
        let watched = Instant::now();
        self.idle_until(watched + rejoin::RATE_WINDOW).await?;
        let members = self.network.view().members;
        let Some((source, ahead)) = rejoin::pick_source(&members, self.me, &self.fingerprint)
        else {
            return Ok(self.rejoin_alone(saved).await);
        };
        let ahead = ahead.max(r0);
        // Within the run: a heartbeat announcing a round past its end is
        // refused, and a member that has finished answers at once.
        let last = self.run.strategy.rounds.saturating_sub(1);
        let entry = rejoin::entry_round(r0, ahead, watched.elapsed()).min(last);
        // The member answers when the entry round starts; wait for that and
        // a few exchanges more.
        let patience = self.run.join_timeout.max(3 * self.run.strategy.timeout);
        let until = Instant::now() + patience;
        // The source, and witnesses to check it against where there are some.
        let mut pulls = Pulls::new(names, &members, self.me, &self.fingerprint, source, ahead);
        for peer in pulls.asked() {
            self.outbox.send(rejoin::request(*peer, entry), patience);
        }
        let mut ask_again = Instant::now() + rejoin::PULL_RETRY;
        self.network.set_role(Role::Node, entry).await;
        info!(asked = ?pulls.asked(), round = ahead, entry, "pulling the run's state to rejoin");
        while self.stop.is_none() && !pulls.done() {
            let wait = Wait { deadline: Some(ask_again.min(until)), network: true, paused: false };
            match self.inputs.next(&mut self.outbox, wait).await {
                Event::Net(NetEvent::Payload { from, payload }) => {
                    let Some(m) = to_message(from, payload) else { continue };
                    match pulls.offer(m.clone()) {
                        None => self.keep(m),
                        Some(Ok(Some((from, round)))) => {
                            info!(%from, round, "a member's state arrived")
                        }
                        Some(Ok(None)) => {}
                        Some(Err(reason)) => warn!(%from, reason, "a pulled part was not taken"),
                    }
                }
                Event::Deadline if Instant::now() < until => {
                    // Members that stopped training (they left, died, or
                    // restarted and pull themselves) will not answer: ask
                    // others in their place.
                    let members = self.network.view().members;
                    let more = pulls.refresh(&members, self.me, &self.fingerprint);
                    if !more.is_empty() {
                        info!(?more, "asking other members: some asked stopped training");
                    }
                    // A member refuses a request from a peer it does not
                    // list yet (its heartbeat may not have arrived): ask
                    // again; a request it holds already is not counted twice.
                    for peer in pulls.waiting() {
                        self.outbox.send(rejoin::request(peer, entry), rejoin::PULL_RETRY);
                    }
                    ask_again = Instant::now() + rejoin::PULL_RETRY;
                }
                Event::Deadline => break,
                Event::NetClosed => return Err(NodeError::NetworkGone),
                other => self.common(other, None)?,
            }
        }
        let asked = pulls.asked().len();
        let answers = pulls.answers();
        let answered = answers.len();
        let settled = match rejoin::settle(answers, last) {
            Ok(settled) => settled,
            Err(why) => {
                warn!(%why, "the pulled states disagree; continuing from the checkpoint");
                self.record.pull_disagreed = Some(why);
                None
            }
        };
        // Witnessed: whether answers confirmed each other (absent where
        // there was no second member to ask).
        self.record.pull_witnessed = (asked > 1)
            .then_some(matches!(settled, Some(Settled::Median(..) | Settled::Witnessed(..))));
        if settled.is_none() && answered == 0 {
            warn!(asked, "no answer to the state pull; continuing from the checkpoint");
        } else if asked > 1 && matches!(settled, Some(Settled::Unchecked(..))) {
            warn!(
                asked,
                answered, "too few members answered to check the state; taking it unchecked"
            );
        }
        if let Some(Settled::Median(_, _, of)) = &settled {
            self.record.pulled_median_of = Some(*of);
        }
        match settled.map(Settled::into_state) {
            Some((from, state)) => {
                let round = state.round;
                self.record.pulled_from = Some(from);
                self.record.pulled = Some((state.names(), round));
                self.reporter.emit(
                    serde_json::json!({"event": "rejoined", "round": round, "from": from.to_string()}),
                    || format!("rejoined at round {round} with the state of {from}"),
                );
                Ok((round, Some(state)))
            }
            None => {
                // The entry round was picked a little ahead of the run; a
                // run that ended meanwhile ends here too, not past its length.
                let round = entry.max(saved.round).min(self.run.strategy.rounds);
                let state = saved.state.clone().map(|s| StrategyState { round, ..s });
                Ok((round, state))
            }
        }
    }

    /// Takes events until `until` (or a stop), keeping early messages.
    async fn idle_until(&mut self, until: Instant) -> Result<(), NodeError> {
        while Instant::now() < until && self.stop.is_none() {
            self.take_one_keeping(until).await?;
        }
        Ok(())
    }

    /// Takes one event (or waits until `deadline`) before the strategy
    /// exists: payloads are kept for it, the rest handled as every stage does.
    async fn take_one_keeping(&mut self, deadline: Instant) -> Result<(), NodeError> {
        let wait = Wait { deadline: Some(deadline), network: true, paused: false };
        match self.inputs.next(&mut self.outbox, wait).await {
            Event::Net(NetEvent::Payload { from, payload }) => {
                if let Some(m) = to_message(from, payload) {
                    self.keep(m);
                }
            }
            Event::NetClosed => return Err(NodeError::NetworkGone),
            other => self.common(other, None)?,
        }
        Ok(())
    }

    /// Events every stage treats alike: trainer replies, finished sends,
    /// API checkpoints, stop requests. Anything else is ignored here.
    fn common(&mut self, event: Event, mixer: Option<&mut dyn Mixer>) -> Result<(), NodeError> {
        match event {
            Event::Trainer(reply) => {
                let done = self.on_trainer(reply)?;
                if let (Some(done), Some(mixer)) = (done, mixer) {
                    let before = mixer.round();
                    debug!(round = before, steps = done.steps_done, "local phase ended");
                    let input = Input::LocalDone { params: done.params, samples: done.samples };
                    let actions = mixer.handle(input, Instant::now());
                    self.execute(mixer, actions, before)?;
                }
            }
            Event::Sent(done) => {
                if let Some(e) = self.outbox.record(done) {
                    let failures = self.outbox.failures();
                    self.board.update(|s| {
                        s.last_error = e;
                        s.send_failures = failures;
                    });
                }
            }
            Event::SaveCheckpoint(reply) => {
                let round = self.board.round();
                let state = Self::checkpoint_state(mixer.as_deref());
                self.checkpoint(round, state, CheckpointFor::Api { reply, round })?;
            }
            Event::Stop(reason) => {
                if self.stop.is_none() {
                    info!(%reason, "stopping");
                }
                self.stop = Some(reason);
            }
            Event::Net(_) | Event::NetClosed | Event::Deadline | Event::FaultsChanged => {}
        }
        Ok(())
    }

    /// Takes one trainer reply; returns a finished local phase. A failed
    /// checkpoint that the API asked for is that call's error; any other
    /// failure ends the node.
    fn on_trainer(&mut self, reply: Reply) -> Result<Option<PhaseDone>, NodeError> {
        let Some(pending) = self.jobs.pop_front() else {
            warn!("a trainer reply nobody asked for");
            return Ok(None);
        };
        let done = match (pending, reply) {
            (Pending::Checkpoint(CheckpointFor::Api { reply, .. }), Err(e)) => {
                warn!("{e}");
                self.board.update(|s| s.last_error = e.to_string());
                let _ = reply.send(Err(e.to_string()));
                return Ok(None);
            }
            (_, Err(e)) => return Err(e.into()),
            (pending, Ok(done)) => (pending, done),
        };
        match done {
            (Pending::Train, Done::Trained(phase)) => {
                self.record.timing.phase(phase.started, phase.seconds, Instant::now());
                self.on_phase_done(&phase);
                if self.finished || self.stop.is_some() {
                    return Ok(None);
                }
                Ok(Some(phase))
            }
            (Pending::SetParams, Done::ParamsSet) => Ok(None),
            (Pending::Evaluate(why), Done::Evaluated { metrics, seconds }) => {
                self.record.timing.side_work(seconds);
                self.on_evaluated(why, metrics);
                Ok(None)
            }
            (Pending::Checkpoint(why), Done::Checkpointed { steps, seconds }) => {
                self.record.timing.side_work(seconds);
                match why {
                    CheckpointFor::Api { reply, round } => {
                        let path = checkpoint::dir_in(&self.data_dir).display().to_string();
                        let _ = reply.send(Ok(SavedCheckpoint { path, step: steps, round }));
                    }
                    CheckpointFor::Final => self.record.final_steps = Some(steps),
                    CheckpointFor::Round => {}
                }
                Ok(None)
            }
            (pending, done) => {
                error!(?pending, ?done, "trainer replies out of order");
                Ok(None)
            }
        }
    }

    fn on_evaluated(&mut self, why: EvalFor, m: EvalMetrics) {
        let (bytes, round) = (self.network.accounting().total(), self.board.round());
        self.record.evaluated(why, m, round, bytes, (&self.reporter, &self.board));
    }

    fn on_phase_done(&mut self, done: &PhaseDone) {
        let (bytes, round) = (self.network.accounting().total(), self.board.round());
        let (rounds, members) = (self.run.strategy.rounds, self.members.len());
        self.record.phase_done(
            done,
            (round, rounds, members),
            bytes,
            (&self.reporter, &self.board),
        );
        // A phase queued behind this one (`overlap`) already runs.
        if self.training_queued() {
            self.board.update(|s| s.phase = Phase::Training);
        }
    }

    /// The strategy's stage: until it finishes or the node is told to stop.
    async fn run_strategy(&mut self, mixer: &mut dyn Mixer) -> Result<Ending, NodeError> {
        let first = mixer.round();
        self.faults.set_round(first, Instant::now());
        self.crash_if_due(first);
        self.board.update(|s| s.round = first);
        let actions = mixer.start(Instant::now());
        self.execute(mixer, actions, first)?;
        for m in std::mem::take(&mut self.backlog) {
            let before = mixer.round();
            let actions = mixer.handle(Input::Received(m), Instant::now());
            self.execute(mixer, actions, before)?;
        }
        loop {
            if self.stop.is_some() {
                return Ok(Ending::Interrupted);
            }
            if self.finished {
                return Ok(Ending::Finished);
            }
            self.note_pause(mixer);
            let wait = Wait {
                deadline: if self.paused { None } else { mixer.deadline() },
                network: !self.paused,
                paused: self.paused,
            };
            let event = self.inputs.next(&mut self.outbox, wait).await;
            let before = mixer.round();
            // What the node logs while it handles this event carries the
            // round (and, for a payload, the peer in the event's fields).
            let _round = tracing::info_span!("round", round = before).entered();
            let now = Instant::now();
            let actions = match event {
                Event::Net(ev) => match self.on_net(ev, mixer) {
                    Some(input) => mixer.handle(input, now),
                    None => Vec::new(),
                },
                Event::NetClosed => return Err(NodeError::NetworkGone),
                Event::Deadline => mixer.handle(Input::Tick, now),
                other => {
                    self.common(other, Some(mixer))?;
                    Vec::new()
                }
            };
            self.execute(mixer, actions, before)?;
            self.recycle_unused();
        }
    }

    /// Shows a pause starting or ending in the status.
    fn note_pause(&mut self, mixer: &dyn Mixer) {
        let paused = self.faults.paused(Instant::now());
        if paused == self.paused {
            // A trainer reply that came in the pause says "mixing": the
            // node is still paused.
            if paused && self.board.phase() != Phase::Paused {
                self.board.update(|s| s.phase = Phase::Paused);
            }
            return;
        }
        self.paused = paused;
        let training = self.training_queued();
        let phase = match (paused, training) {
            (true, _) => Phase::Paused,
            (false, true) => Phase::Training,
            (false, false) => Phase::Mixing,
        };
        let round = mixer.round();
        self.board.update(|s| {
            s.phase = phase;
            s.round = round;
        });
    }

    /// A network event as a strategy input, if it is one.
    fn on_net(&mut self, ev: NetEvent, mixer: &mut dyn Mixer) -> Option<Input> {
        match ev {
            NetEvent::Payload { from, payload } => {
                let m = to_message(from, payload)?;
                match m.kind {
                    MsgKind::PullRequest => {
                        let (view, now, entry) = (self.network.view(), Instant::now(), m.slot);
                        match self.pulls.request(from, entry, &view.members, &self.fingerprint, now)
                        {
                            Ok(()) => {
                                info!(peer = %from, entry, "a member asks for the run's state")
                            }
                            // Counted, not logged: a flood of requests must
                            // not fill the log (a retry of a held one is
                            // expected from an honest joiner).
                            Err(reason) => *self.pull_refusals.entry(reason).or_default() += 1,
                        }
                        // Served right away when the strategy has finished.
                        if self.finished {
                            self.serve_pulls(Some(mixer));
                        }
                        None
                    }
                    MsgKind::PullReply => None,
                    _ => {
                        debug!(peer = %from, slot = m.slot, kind = m.kind.label(), "payload arrived");
                        self.in_use.push(m.values.clone());
                        Some(Input::Received(m))
                    }
                }
            }
            NetEvent::Refused { from, header: Some(h) } => {
                let kind = MsgKind::from_wire(h.kind)?;
                Some(Input::Refused { peer: from, kind, slot: h.round })
            }
            NetEvent::Refused { .. } => None,
            NetEvent::MemberJoined(_) | NetEvent::MemberLeft(_) => self.members_changed(mixer),
            NetEvent::Disconnected(peer) => {
                self.members.contains(&peer).then_some(Input::Unreachable(peer))
            }
        }
    }

    /// The members the strategy's next round runs with, if they changed
    /// (a strategy that fixes its members at a round start takes them then).
    fn members_changed(&mut self, mixer: &dyn Mixer) -> Option<Input> {
        let now = self.members_in(mixer.round() + 1);
        (now != self.members).then(|| {
            let before = std::mem::replace(&mut self.members, now.clone());
            let joined = now.iter().filter(|p| before.binary_search(p).is_err()).copied().collect();
            Input::Members { members: now.into(), joined }
        })
    }

    /// Carries out the strategy's actions; `round_before` is its round
    /// before the input that produced them.
    fn execute(
        &mut self,
        mixer: &mut dyn Mixer,
        actions: Vec<Action>,
        round_before: u64,
    ) -> Result<(), NodeError> {
        let mut round_end_due = mixer.round() != round_before;
        for a in actions {
            match a {
                Action::Send(m) => self.outbox.send(m, self.run.strategy.timeout),
                Action::SetParams(v) => {
                    debug!(round = round_before, "mixed parameters to the trainer");
                    self.record.timing.mixed(Instant::now());
                    self.set_params(v)?
                }
                Action::Shift(delta) => {
                    debug!(round = round_before, "mixed change queued on the trainer");
                    self.record.timing.mixed(Instant::now());
                    self.shift_params(delta)?
                }
                Action::Train { steps } => {
                    // Round-end work sees the mixed model: it is queued
                    // after the new parameters and before the next phase.
                    if std::mem::take(&mut round_end_due) {
                        self.round_end(mixer)?;
                    }
                    self.submit(Job::Train { steps }, Pending::Train)?;
                    self.board.update(|s| s.phase = Phase::Training);
                }
                Action::Evaluate { label } => {
                    let why = EvalFor::Label(label, mixer.round());
                    self.submit(Job::Evaluate, Pending::Evaluate(why))?;
                }
                Action::Finish => {
                    if std::mem::take(&mut round_end_due) {
                        self.round_end(mixer)?;
                    }
                    self.record.timing.finished(Instant::now());
                    self.finished = true;
                }
            }
        }
        if round_end_due {
            self.round_end(mixer)?;
        }
        self.publish(mixer);
        Ok(())
    }

    /// A round ended: announce it, crash if told to, queue the evaluation
    /// and checkpoint that are due, and answer the pulls that waited for it.
    fn round_end(&mut self, mixer: &mut dyn Mixer) -> Result<(), NodeError> {
        let round = mixer.round();
        self.network.set_round(round);
        self.faults.set_round(round, Instant::now());
        self.crash_if_due(round);
        let every = (self.train.eval_every, self.train.checkpoint_every);
        let (before, now) = (self.record.steps_at_round_end, self.record.steps_done);
        self.record.steps_at_round_end = now;
        let due = round_end::due(before, now, every, round, self.run.strategy.rounds);
        if due.evaluate {
            self.submit(Job::Evaluate, Pending::Evaluate(EvalFor::Round(round)))?;
        }
        if due.checkpoint {
            self.checkpoint(round, Self::checkpoint_state(Some(&*mixer)), CheckpointFor::Round)?;
        }
        // A joiner whose entry round is next counts from now on.
        if let Some(input) = self.members_changed(mixer) {
            let actions = mixer.handle(input, Instant::now());
            self.execute_sends(actions);
        }
        self.serve_pulls(Some(mixer));
        Ok(())
    }

    /// Carries out the sends among `actions` (a membership change asks for
    /// nothing else).
    fn execute_sends(&mut self, actions: Vec<Action>) {
        for a in actions {
            if let Action::Send(m) = a {
                self.outbox.send(m, self.run.strategy.timeout);
            }
        }
    }

    /// Sends the strategy's state to every peer whose pull waited.
    fn serve_pulls(&mut self, mixer: Option<&mut dyn Mixer>) {
        if !self.pulls.has_pending() {
            return;
        }
        let Some(state) = mixer.and_then(|m| m.snapshot()) else { return };
        let patience = self.run.join_timeout.max(self.run.strategy.timeout);
        // A joiner is answered at the start of the round it announced (it
        // counts among that round's members), or at the end, whoever waits.
        let members = self.members.clone();
        let (finished, round) = (self.finished, state.round);
        let ready = |p: &PeerId, entry: u64| finished || (members.contains(p) && round >= entry);
        for peer in self.pulls.take(Instant::now(), ready) {
            info!(%peer, round = state.round, "sending the run's state to a rejoining member");
            for m in rejoin::reply(peer, &state) {
                self.outbox.send(m, patience);
            }
        }
    }

    /// Gives the network back the received buffers the strategy let go of.
    fn recycle_unused(&mut self) {
        for values in std::mem::take(&mut self.in_use) {
            match Arc::try_unwrap(values) {
                Ok(v) => self.network.recycle(v),
                Err(still_held) => self.in_use.push(still_held),
            }
        }
    }

    /// Exits as a crashed process would, if an injected crash is due as
    /// `round` begins: no checkpoint, no summary, a non-zero status.
    fn crash_if_due(&self, round: u64) {
        if self.faults.crash_due(round, Instant::now()) {
            error!(round, "injected crash");
            eprintln!(
                "murmur run: injected crash at round {round} (exit status {CRASH_EXIT_CODE})"
            );
            std::process::exit(CRASH_EXIT_CODE);
        }
    }

    /// What was not mixed, by reason: the strategy's drops and the
    /// messages the backlog had no room for.
    fn drops(&self, mixer: &dyn Mixer) -> BTreeMap<String, u64> {
        let mut drops: BTreeMap<String, u64> =
            mixer.dropped().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        if self.backlog_dropped > 0 {
            drops.insert("backlog_full".into(), self.backlog_dropped);
        }
        if self.non_finite_refused > 0 {
            drops.insert("non_finite_mix".into(), self.non_finite_refused);
        }
        for (reason, n) in &self.pull_refusals {
            drops.insert((*reason).to_string(), *n);
        }
        drops
    }

    /// Copies what the strategy knows into the status.
    fn publish(&mut self, mixer: &dyn Mixer) {
        let drops = self.drops(mixer);
        let (round, distance, outer) = (mixer.round(), mixer.neighbour_distance(), mixer.outer());
        let failures = self.outbox.failures();
        let coordinator = self.coordinator_link(mixer);
        self.board.update(|s| {
            s.round = round;
            s.strategy_drops = drops;
            s.consensus_distance = distance;
            s.send_failures = failures;
            s.outer = outer;
            s.coordinator = coordinator;
        });
    }

    /// The coordinator and what the strategy did with it; says once when
    /// it is lost (its heartbeats stopped) and once when it is back.
    fn coordinator_link(&mut self, mixer: &dyn Mixer) -> Option<(PeerId, Coordination)> {
        let peer = self.run.strategy.coordinator.as_ref()?.coordinator;
        let live = self.network.has_member(&peer, Role::Coordinator);
        if live != self.coordinator_live {
            self.coordinator_live = live;
            match live {
                true => info!(%peer, "coordinator: connected; taking its averages"),
                false => {
                    warn!(%peer, "coordinator: lost; going on with gossip alone until it returns")
                }
            }
        }
        Some((peer, mixer.coordination().unwrap_or_default()))
    }

    /// The final checkpoint and evaluation, while the last sends go out
    /// (for at most one exchange deadline) and pulls are still answered;
    /// then `summary.json`.
    async fn finish(
        &mut self,
        mixer: &mut dyn Mixer,
        resumed: Option<u64>,
        ending: Ending,
    ) -> Result<NodeSummary, NodeError> {
        self.board.update(|s| s.phase = Phase::Finishing);
        let interrupted = ending == Ending::Interrupted;
        self.finished = true;
        if interrupted {
            // A stopping node drops its faults (a pause must not keep it
            // from writing its checkpoint) and trains no more steps.
            self.faults.clear(&[]);
            self.worker.stop_training();
        }
        let round = mixer.round();
        self.serve_pulls(Some(mixer));
        // An interrupt can leave a local phase running (and, overlapped, one
        // queued); the trainer ends them at the next step first, so the
        // checkpoint says how many steps were really done.
        self.checkpoint(round, Self::checkpoint_state(Some(&*mixer)), CheckpointFor::Final)?;
        self.submit(Job::Evaluate, Pending::Evaluate(EvalFor::Final))?;
        let grace = Instant::now() + self.run.strategy.timeout;
        loop {
            let trainer_done = self.jobs.is_empty();
            let sends_done = self.outbox.is_idle() || Instant::now() >= grace;
            if trainer_done && sends_done {
                break;
            }
            let deadline = if sends_done { None } else { Some(grace) };
            let wait = Wait { deadline, network: true, paused: false };
            match self.inputs.next(&mut self.outbox, wait).await {
                // Peers still finishing an exchange are answered (an owner's
                // result), but nothing changes this node's model any more.
                Event::Net(ev) => {
                    if let Some(input) = self.on_net(ev, mixer) {
                        let actions = mixer.handle(input, Instant::now());
                        self.execute_sends(actions);
                    }
                    self.recycle_unused();
                }
                Event::Stop(_) | Event::NetClosed | Event::Deadline => {}
                other => self.common(other, None)?,
            }
        }
        self.summary(mixer, round, resumed, interrupted)
    }

    fn summary(
        &mut self,
        mixer: &dyn Mixer,
        round: u64,
        resumed: Option<u64>,
        interrupted: bool,
    ) -> Result<NodeSummary, NodeError> {
        let steps = self.record.final_steps.unwrap_or(self.record.steps_done);
        let final_eval = self.record.final_eval.unwrap_or_default();
        let acc = self.network.accounting();
        let outer = mixer.outer();
        let (peak_rss_bytes, file_rss_bytes) = crate::memory::peak_and_file_rss_bytes();
        let summary = NodeSummary {
            murmur_version: env!("CARGO_PKG_VERSION"),
            peer_id: self.me.to_string(),
            run_id: self.run.run_id.clone(),
            strategy: self.run.strategy.kind.to_string(),
            node: self.train.node,
            nodes: self.train.nodes,
            rounds: round,
            steps,
            resumed_from_round: resumed,
            pulled_from: self.record.pulled_from.map(|p| p.to_string()),
            pulled_parts: self.record.pulled.as_ref().map(|(p, _)| p.clone()).unwrap_or_default(),
            pulled_round: self.record.pulled.as_ref().map(|(_, r)| *r),
            pull_witnessed: self.record.pull_witnessed,
            pulled_median_of: self.record.pulled_median_of,
            pull_disagreed: self.record.pull_disagreed.clone(),
            members_at_start: self.record.members_at_start,
            interrupted,
            wall_seconds: self.started.elapsed().as_secs_f64(),
            peak_rss_bytes,
            file_rss_bytes,
            parameters: self.parameters,
            fingerprint: self.fingerprint.clone(),
            bytes: acc.total(),
            traffic_by_peer: acc.by_peer(),
            refusals: acc.refusals.clone(),
            strategy_drops: self.drops(mixer),
            send_failures: self.outbox.failures(),
            fault_effects: self.faults.effects(),
            timing: self.record.timing.clone(),
            evals: std::mem::take(&mut self.record.evals),
            local: self.record.local_metrics.clone(),
            final_metrics: FinalMetrics::new(self.record.last_loss, &final_eval),
            outer,
            bytes_per_outer_step: outer
                .filter(|o| o.steps > 0)
                .map(|o| acc.total().bytes_sent as f64 / o.steps as f64),
            coordinator: mixer.coordination(),
            config: self.options.clone(),
        };
        let path = self.data_dir.join("summary.json");
        summary.write(&path)?;
        self.reporter.emit(
            serde_json::json!({"event": "done", "summary": path, "final": summary.final_metrics}),
            || format!("done: round {round}, {}; summary in {}", final_eval, path.display()),
        );
        Ok(summary)
    }
}
